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
from .kv_cache import KVShape, PagedKVCache, zeroed
from .plan import RowInput


@dataclass(frozen=True, slots=True)
class LaneFill:
    """Copy rows' contexts from the pool into their new lanes (positions 0..length-1)."""

    lanes: torch.Tensor  # [f] long: the lanes to fill
    gather: torch.Tensor  # [f * KVH * nb] long: pool rows of their blocks (`gather_index`)
    length: int  # positions copied per lane: the longest context among them


@dataclass(frozen=True, slots=True)
class LaneGroup:
    """This step's decode rows that read one tier's lanes 0..w-1; shared by all layers."""

    store: LaneTier  # the lanes they read
    rows: torch.Tensor  # [w] long: the decode row (index among the decode rows) of each lane
    write_index: torch.Tensor  # [KVH * w] long: flat lane rows of the new tokens' KV
    mask: torch.Tensor  # [w, 1, 1, K] bool: positions each lane holds
    fill: LaneFill | None  # lanes new this step, filled from the pool before the write

    @property
    def width(self) -> int:
        """w: lanes read, one per row."""
        return int(self.mask.shape[0])

    @property
    def kv_len(self) -> int:
        """K: positions read per lane (the longest row's)."""
        return int(self.mask.shape[-1])


@dataclass(slots=True)
class HeldLane:
    """A lane and the sequence holding it."""

    lane: int
    history: TokenHistory  # the sequence: identity, and a reference so no other takes its id
    length: int  # positions the lane holds (0..length-1), equal to the pool's


class LaneTier:
    """A tier's buffers and which sequence holds which of its lanes (step thread only)."""

    def __init__(
        self, shape: KVShape, lanes: int, lane_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if lanes < 1 or lane_len < 1:
            raise ValueError(
                f"decode lanes need lanes >= 1 and lane_len >= 1, got {lanes}, {lane_len}"
            )
        self.shape = shape
        self.lane_len = lane_len
        dims = (shape.layers, lanes, shape.kv_heads, lane_len, shape.head_dim)
        self.keys = zeroed(dims, dtype, device)  # [L, lanes, KVH, lane_len, Dh]
        self.values = zeroed(dims, dtype, device)  # [L, lanes, KVH, lane_len, Dh]
        self.held: dict[int, HeldLane] = {}  # id(history) -> its lane; lanes 0..n-1 after plan

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

    def plan(
        self,
        cache: PagedKVCache,
        decode: Sequence[RowInput],
        kept: list[int],
        new: list[int],
        device: torch.device,
    ) -> LaneGroup | None:
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
        return self._group(cache, decode, [by_lane[lane] for lane in range(total)], fills, device)

    def write(self, layer: int, group: LaneGroup, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the lane rows' new keys/values `[KVH, w, Dh]` of one layer."""
        head_dim = self.shape.head_dim
        self.keys[layer].view(-1, head_dim)[group.write_index] = keys.reshape(-1, head_dim)
        self.values[layer].view(-1, head_dim)[group.write_index] = values.reshape(-1, head_dim)

    def fill(self, layer: int, cache: PagedKVCache, fill: LaneFill) -> None:
        """Copy the new lanes' contexts of one layer from the pool."""
        rows = int(fill.lanes.numel())
        keys, values = cache.gather(layer, fill.gather, rows, fill.length)  # [f, KVH, n, Dh]
        self.keys[layer, :, :, : fill.length][fill.lanes] = keys
        self.values[layer, :, :, : fill.length][fill.lanes] = values

    def view(self, layer: int, group: LaneGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of lanes 0..w-1, each `[w, KVH, K, Dh]` (strided, no copy)."""
        w, k = group.width, group.kv_len
        return self.keys[layer, :w, :, :k], self.values[layer, :w, :, :k]

    def _move(self, src: int, dst: int, length: int) -> None:
        """Copy lane `src`'s positions 0..length-1 of every layer into lane `dst`."""
        for buf in (self.keys, self.values):
            buf[:, dst, :, :length] = buf[:, src, :, :length]

    def _group(
        self,
        cache: PagedKVCache,
        decode: Sequence[RowInput],
        rows: list[int],
        fills: list[tuple[int, RowInput]],
        device: torch.device,
    ) -> LaneGroup:
        """The group of lanes 0..w-1, held by decode rows `rows` (in lane order)."""
        kv_heads, lane_len = self.shape.kv_heads, self.lane_len
        starts = torch.tensor([decode[i].start for i in rows], device=device)  # [w]
        kv_len = int(starts.max()) + 1  # K
        mask = torch.arange(kv_len, device=device)[None, :] <= starts[:, None]  # [w, K]
        lanes = torch.arange(len(rows), device=device)  # [w]
        heads = torch.arange(kv_heads, device=device)[:, None]  # [KVH, 1]
        write_index = ((lanes[None, :] * kv_heads + heads) * lane_len + starts[None, :]).reshape(-1)
        return LaneGroup(
            store=self,
            rows=torch.tensor(rows, device=device),
            write_index=write_index,  # [KVH * w]
            mask=mask.view(len(rows), 1, 1, kv_len),  # [w, 1, 1, K]
            fill=_fill(cache, [f for f in fills if f[1].start > 0], device),
        )


def _fill(
    cache: PagedKVCache, fills: list[tuple[int, RowInput]], device: torch.device
) -> LaneFill | None:
    """The pool-to-lane copy of rows new to their lanes: their positions 0..start-1."""
    if not fills:
        return None
    bs = cache.block_size
    length = max(r.start for _, r in fills)  # n
    width = -(-length // bs)  # nb
    tables = []
    for _, r in fills:
        own = list(r.block_table[: -(-r.start // bs)])
        tables.append(own + [own[0]] * (width - len(own)))  # padding: past the row's length
    return LaneFill(
        lanes=torch.tensor([lane for lane, _ in fills], device=device),
        gather=cache.gather_index(torch.tensor(tables, device=device)),  # [f * KVH * nb]
        length=length,
    )
