"""Decode lanes: contiguous copies of decoding sequences' KV, so decode reads without a gather.

A decode row's keys and values are spread over pool blocks; attending over
them means gathering the blocks into one contiguous tensor, in every layer,
every step: a copy of the row's whole context for one new token. A lane is a
fixed slot of contiguous positions: a sequence that decodes gets one, its
context is copied in from the pool once, then each step appends the new
token's keys/values to both the pool and the lane, and the decode attention
reads a tier's lanes at once as a strided view `[lanes, KVH, K, Dh]`. The pool
stays the KV's home: a lane is a cache of it, and everything else (prefill,
prefix sharing, copy on write, preemption) only ever sees the pool.

Decode attention reads memory: every lane read costs its tier's longest row
(K), so lanes come in tiers of growing length (`lane_tier.py`): a sequence
takes a lane in the shortest tier it fits, moves up (refilled from the pool)
when it outgrows it, and each tier is read up to its own longest row; a tier
keeps its lanes compact, so no finished sequence's lane is read. On a W1-like
step this halves what the lanes read (bench/decode_lanes.py).

A lane is kept across steps only while it provably mirrors the pool: the
same sequence (the very `TokenHistory` object the request owns; the lane
keeps a reference, so no other object can take its identity) decodes again
with its lane one position short of its new token. A sequence absent from a
step's decode rows (finished, preempted, waiting, prefilling) loses its lane;
a failed step drops every lane. Rows longer than the longest tier, and rows
that find no free lane in a tier they fit, are attended through the gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate, pairwise

import torch

from .kv_arena import KVArena
from .kv_cache import KVShape, PagedKVCache
from .lane_tier import HeldLane, LaneGroup, LaneTier
from .plan import RowInput

__all__ = ["DecodeLanes", "HeldLane", "LaneGroup", "LaneTier", "allocate_kv"]


def allocate_kv(
    shape: KVShape, tiers: Sequence[tuple[int, int]], dtype: torch.dtype, device: torch.device
) -> tuple[PagedKVCache, DecodeLanes | None]:
    """The KV pool of `shape` and decode lanes in `tiers` ((lanes, lane_len) each, in
    increasing lane_len; none: no lanes), in one arena: the pool's rows, then each tier's."""
    if any(b[1] <= a[1] for a, b in pairwise(tiers)):
        raise ValueError(f"decode lane tiers must grow in length, got {list(tiers)}")
    sizes = [PagedKVCache.rows_for(shape)]
    sizes += [LaneTier.rows_for(shape, n, length) for n, length in tiers]
    arena = KVArena(shape.layers, sum(sizes), shape.head_dim, shape.block_size, dtype, device)
    cache = PagedKVCache(shape, arena)
    starts = list(accumulate(sizes))[:-1]  # a tier's first row: after the pool and tiers before
    lanes = [
        LaneTier(shape, n, length, arena, start)
        for (n, length), start in zip(tiers, starts, strict=True)
    ]
    return cache, (DecodeLanes(lanes) if lanes else None)


class DecodeLanes:
    """The lane tiers, shortest lanes first, and which sequence holds which lane.

    Used by one thread (the step thread): `plan` once per step before the
    forward (the layout turns its groups into the indices every layer uses),
    `reset` when a step fails.
    """

    def __init__(self, tiers: Sequence[LaneTier]) -> None:
        """`tiers`: in increasing lane_len (`allocate_kv` builds them)."""
        self.tiers = list(tiers)

    @property
    def lane_len(self) -> int:
        """The longest lane: rows longer than this are gathered."""
        return self.tiers[-1].lane_len

    @property
    def lanes(self) -> int:
        return sum(t.lanes for t in self.tiers)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tiers)

    def held(self) -> list[HeldLane]:
        """The lanes held now (after the last `plan`), with their sequences and lengths."""
        return [h for t in self.tiers for h in t.held.values()]

    def plan(self, decode: Sequence[RowInput]) -> list[LaneGroup]:
        """Give lanes to this step's decode rows that fit one; one group per tier used.

        Sequences not decoding this step lose their lanes first. A row keeps its
        lane when the lane holds exactly its positions before this token; else it
        takes a lane in the shortest tier it fits that has one free (filled from
        the pool this step). Records each lane's length after the step: call
        `reset` if the step fails.
        """
        decoding = {id(r.history) for r in decode}
        for tier in self.tiers:
            for key in [k for k in tier.held if k not in decoding]:
                tier.release(key)
        kept: list[list[int]] = [[] for _ in self.tiers]
        new: list[list[int]] = [[] for _ in self.tiers]
        for i, r in enumerate(decode):
            key = id(r.history)
            holder = next((t for t, tier in enumerate(self.tiers) if key in tier.held), None)
            if holder is not None:
                if self.tiers[holder].continues(key, r):
                    kept[holder].append(i)
                    continue
                self.tiers[holder].release(key)
            for t, tier in enumerate(self.tiers):
                free = tier.lanes - len(tier.held) - len(new[t])
                if r.start + 1 <= tier.lane_len and free > 0:
                    new[t].append(i)
                    break
        groups = [tier.plan(decode, kept[t], new[t]) for t, tier in enumerate(self.tiers)]
        return [g for g in groups if g is not None]

    def reset(self) -> None:
        """Drop every lane (a step failed: what the lanes hold is unknown)."""
        for tier in self.tiers:
            tier.held.clear()
