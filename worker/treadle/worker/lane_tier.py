"""One tier of decode lanes: `lanes` contiguous KV slots of `lane_len` positions each.

A tier's held lanes are always 0..n-1 (compact): attention reads them as one
strided view `[n, KVH, K, Dh]` with K its longest row's length, so a lane left
by a finished sequence is never read again. When sequences leave, new
sequences take the holes first (they are filled from the pool anyway); a hole
left over is closed by moving the tier's highest lane into it, a copy of that
lane's positions (at most one per leaving sequence, done while planning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .history import TokenHistory
from .kv_arena import KVArena
from .kv_cache import KVShape
from .plan import RowInput


@dataclass(frozen=True, slots=True)
class LaneGroup:
    """This step's decode rows that read one tier's lanes 0..w-1 (the layout, `layout.py`,
    turns it into indices and a mask shared by all layers)."""

    store: LaneTier  # the lanes they read
    rows: list[int]  # the decode row (index among the decode rows) of each lane, in lane order
    starts: list[int]  # each lane's row's position this step (its context before the token)
    fills: list[tuple[int, RowInput]]  # (lane, row) new this step with positions to copy in
    #                                    from the pool (0..start-1), before the write

    @property
    def width(self) -> int:
        """w: lanes read, one per row."""
        return len(self.rows)

    @property
    def kv_len(self) -> int:
        """K: positions read per lane (the longest row's, its new token included)."""
        return max(self.starts) + 1


@dataclass(slots=True)
class HeldLane:
    """A lane and the sequence holding it."""

    lane: int
    history: TokenHistory  # the sequence: identity, and a reference so no other takes its id
    length: int  # positions the lane holds (0..length-1), equal to the pool's


class LaneTier:
    """A tier's lanes, a region of the worker's `KVArena`, and which sequence holds which
    lane (step thread only)."""

    def __init__(
        self, shape: KVShape, lanes: int, lane_len: int, arena: KVArena, offset: int
    ) -> None:
        """The tier in `arena`'s rows offset.. (`rows_for` of them): keys, then values."""
        if lanes < 1 or lane_len < 1 or lane_len % shape.block_size:
            raise ValueError(
                f"decode lanes need lanes >= 1 and lane_len a whole number of blocks of "
                f"{shape.block_size}, got {lanes}, {lane_len}"
            )
        self.shape = shape
        self.lane_len = lane_len
        self.offset = offset
        dims = (lanes, shape.kv_heads, lane_len)
        self.keys = arena.region(offset, dims)  # [L, lanes, KVH, lane_len, Dh]
        half = self.rows_for(shape, lanes, lane_len) // 2  # the keys' rows
        self.values = arena.region(offset + half, dims)  # [L, lanes, KVH, lane_len, Dh]
        self.held: dict[int, HeldLane] = {}  # id(history) -> its lane; lanes 0..n-1 after plan

    @staticmethod
    def rows_for(shape: KVShape, lanes: int, lane_len: int) -> int:
        """Arena rows a tier takes: keys and values of every lane's heads and positions."""
        return 2 * lanes * shape.kv_heads * lane_len

    @property
    def _half(self) -> int:  # rows of the keys (the values follow them)
        return self.rows_for(self.shape, self.lanes, self.lane_len) // 2

    @property
    def lanes(self) -> int:
        return int(self.keys.shape[1])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def release(self, key: int) -> None:
        del self.held[key]

    def continues(self, key: int, r: RowInput) -> bool:
        """Whether the lane of `key` holds exactly `r`'s positions before its token."""
        held = self.held.get(key)
        return held is not None and held.length == r.start and r.start + 1 <= self.lane_len

    def plan(self, decode: Sequence[RowInput], kept: list[int], new: list[int]) -> LaneGroup | None:
        """Lanes 0..n-1 for decode rows `kept` (continuing in their lanes) and `new` (filled
        from the pool); every other sequence must have been released. Moves lanes to close
        holes and records each lane's length after the step."""
        total = len(kept) + len(new)
        if not total:
            return None
        by_lane: dict[int, int] = {self.held[id(decode[i].history)].lane: i for i in kept}
        holes = [lane for lane in range(total) if lane not in by_lane]
        movers = sorted(lane for lane in by_lane if lane >= total)
        for i in new:  # new rows fill holes first: they are copied in anyway
            r = decode[i]
            self.held[id(r.history)] = HeldLane(holes.pop(), r.history, r.start)
            by_lane[self.held[id(r.history)].lane] = i
        for src, dst in zip(movers, holes, strict=True):  # then the highest lanes move down
            i = by_lane.pop(src)
            self._move(src, dst, decode[i].start)
            self.held[id(decode[i].history)].lane = dst
            by_lane[dst] = i
        fills = [(self.held[id(decode[i].history)].lane, decode[i]) for i in new]
        for i in by_lane.values():
            self.held[id(decode[i].history)].length = decode[i].start + 1
        rows = [by_lane[lane] for lane in range(total)]
        return LaneGroup(
            store=self,
            rows=rows,
            starts=[decode[i].start for i in rows],
            fills=[(lane, r) for lane, r in fills if r.start > 0],
        )

    def write_rows(self, starts: torch.Tensor) -> torch.Tensor:
        """Arena rows `[2, KVH, w]` of lanes 0..w-1 at positions `starts` `[w]` (their new
        tokens'): keys, then values."""
        kv_heads, lane_len = self.shape.kv_heads, self.lane_len
        lanes = torch.arange(starts.numel(), device=starts.device)  # [w]
        heads = torch.arange(kv_heads, device=starts.device)[:, None]  # [KVH, 1]
        rows = (lanes[None, :] * kv_heads + heads) * lane_len + starts[None, :]  # [KVH, w]
        return self.offset + torch.stack((rows, rows + self._half))  # [2, KVH, w]

    def block_rows(self, lane: int, blocks: int) -> list[int]:
        """Arena block rows of `lane`'s first `blocks` blocks, in `[2, KVH, blocks]` order
        (keys, then values): where a fill of positions 0..blocks*bs-1 lands."""
        bs, kv_heads = self.shape.block_size, self.shape.kv_heads
        per_lane = self.lane_len // bs  # blocks of one head's lane
        first = self.offset // bs
        half = self._half // bs
        return [
            first + kind * half + (lane * kv_heads + h) * per_lane + j
            for kind in (0, 1)
            for h in range(kv_heads)
            for j in range(blocks)
        ]

    def view(self, layer: int, w: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0..k-1 of lanes 0..w-1, each `[w, KVH, k, Dh]`
        (strided, no copy)."""
        return self.keys[layer, :w, :, :k], self.values[layer, :w, :, :k]

    def _move(self, src: int, dst: int, length: int) -> None:
        """Copy lane `src`'s positions 0..length-1 of every layer into lane `dst`."""
        for buf in (self.keys, self.values):
            buf[:, dst, :, :length] = buf[:, src, :, :length]
