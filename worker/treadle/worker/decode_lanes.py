"""Decode lanes: contiguous copies of decoding sequences' KV, so decode reads without a gather.

A decode row's keys and values are spread over pool blocks; attending over
them means gathering the blocks into one contiguous tensor, in every layer,
every step: a copy of the row's whole context for one new token. On the CPU
lanes make a W1-like step 3% shorter (bench/decode_lanes.py: 265.6 against
276.8 ms at 50 rows, bench/results/decode-lanes-20261130.txt).

A lane is a fixed slot of `lane_len` positions in two buffers of shape
`[layers, lanes, kv_heads, lane_len, head_dim]`. A sequence that decodes gets
a lane; its context is copied in from the pool once, then each step appends
the new token's keys/values to both the pool and the lane, and the decode
attention reads all lanes at once as a strided view `[lanes, KVH, K, Dh]`,
as the pre-paged slot rows did. The pool stays the KV's home: a lane is a
cache of it, and everything else (prefill, prefix sharing, copy on write,
preemption) only ever sees the pool.

A lane is kept across steps only while it provably mirrors the pool: the
same sequence (the very `TokenHistory` object the request owns; the lane
keeps a reference, so no other object can take its identity) decodes again
with its lane one position short of its new token. A sequence absent from a
step's decode rows (finished, preempted, waiting, prefilling) loses its lane;
a failed step drops every lane. Rows longer than `lane_len`, and rows that
find no free lane, are attended through the gather as before.
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
    """This step's decode rows that read their KV from lanes; shared by all layers."""

    store: DecodeLanes  # the lanes they read
    rows: torch.Tensor  # [m] long: the rows, as indices among the decode rows
    lanes: torch.Tensor  # [m] long: each row's lane
    write_index: torch.Tensor  # [KVH * m] long: flat lane rows of the new tokens' KV
    mask: torch.Tensor  # [w, 1, 1, K] bool: positions each lane 0..w-1 holds (idle: one)
    fill: LaneFill | None  # lanes new this step, filled from the pool before the write

    @property
    def width(self) -> int:
        """w: lanes read (the highest one used, plus one); idle lanes among them are masked."""
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


class DecodeLanes:
    """The lane buffers and which sequence holds which lane.

    Used by one thread (the step thread): `plan` once per step before the
    forward, `write`/`fill`/`view` from every layer's attention, `reset`
    when a step fails.
    """

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
        self._held: dict[int, HeldLane] = {}  # id(history) -> its lane
        self._free = list(range(lanes - 1, -1, -1))  # a stack: the lowest lane on top

    @property
    def lanes(self) -> int:
        return int(self.keys.shape[1])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def held(self) -> list[HeldLane]:
        """The lanes held now (after the last `plan`), with their sequences and lengths."""
        return list(self._held.values())

    def plan(
        self, cache: PagedKVCache, decode: Sequence[RowInput], device: torch.device
    ) -> LaneGroup | None:
        """Give lanes to this step's decode rows that fit one; None when no row does.

        Sequences not decoding this step lose their lanes first. A row keeps its
        lane when the lane holds exactly its positions before this token; else it
        takes a free lane (filled from the pool this step). Records each lane's
        length after the step: call `reset` if the step fails.
        """
        decoding = {id(r.history) for r in decode}
        for key in [k for k in self._held if k not in decoding]:
            self._release(key)
        rows: list[int] = []
        lanes: list[int] = []
        fills: list[tuple[int, RowInput]] = []
        for i, r in enumerate(decode):
            key = id(r.history)
            held = self._held.get(key)
            if r.start + 1 > self.lane_len:  # too long for a lane: gathered
                if held is not None:
                    self._release(key)
                continue
            if held is None or held.length != r.start:  # new, or was not continuing
                if held is not None:
                    self._release(key)
                if not self._free:
                    continue
                held = HeldLane(self._free.pop(), r.history, 0)
                self._held[key] = held
                if r.start > 0:
                    fills.append((held.lane, r))
            held.length = r.start + 1
            rows.append(i)
            lanes.append(held.lane)
        if not rows:
            return None
        return self._group(cache, decode, rows, lanes, fills, device)

    def reset(self) -> None:
        """Drop every lane (a step failed: what the lanes hold is unknown)."""
        for key in list(self._held):
            self._release(key)

    def write(self, layer: int, group: LaneGroup, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the lane rows' new keys/values `[KVH, m, Dh]` of one layer."""
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

    def _release(self, key: int) -> None:
        self._free.append(self._held.pop(key).lane)
        self._free.sort(reverse=True)  # keep the lowest free lane on top: lanes stay packed

    def _group(
        self,
        cache: PagedKVCache,
        decode: Sequence[RowInput],
        rows: list[int],
        lanes: list[int],
        fills: list[tuple[int, RowInput]],
        device: torch.device,
    ) -> LaneGroup:
        kv_heads, lane_len = self.shape.kv_heads, self.lane_len
        width = max(lanes) + 1  # w
        lengths = [1] * width  # an idle lane shows one (zero or stale, finite) position
        for i, lane in zip(rows, lanes, strict=True):
            lengths[lane] = decode[i].start + 1
        kv_len = max(lengths)  # K
        lens = torch.tensor(lengths, device=device)  # [w]
        mask = torch.arange(kv_len, device=device)[None, :] < lens[:, None]  # [w, K]
        lane_t = torch.tensor(lanes, device=device)  # [m]
        pos = torch.tensor([decode[i].start for i in rows], device=device)  # [m]
        heads = torch.arange(kv_heads, device=device)[:, None]  # [KVH, 1]
        write_index = ((lane_t[None, :] * kv_heads + heads) * lane_len + pos[None, :]).reshape(-1)
        return LaneGroup(
            store=self,
            rows=torch.tensor(rows, device=device),
            lanes=lane_t,
            write_index=write_index,  # [KVH * m]
            mask=mask.view(width, 1, 1, kv_len),  # [w, 1, 1, K]
            fill=_fill(cache, fills, device),
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
