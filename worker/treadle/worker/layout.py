"""A step's layout: where each packed token sits, and the indices and masks every layer uses.

A step runs the model once on a packed sequence of T tokens: first one token
for each decoding row, then each prefilling row's chunk. The decode tokens are
packed in reading order, not in the plan's: the rows of each lane tier
(`decode_lanes.py`) in lane order, then the rows gathered from the pool, one
group of similar length after another. So every batch the attention reads
(a tier's lanes, a gathered group, a chunk) is a contiguous run of the packed
tokens: its queries are a slice and its outputs are concatenated, with no
index copy per layer (`decode_order` maps packed decode tokens back to rows).

Built once per step (`PagedLayout.build`), before the forward; shared by all
layers. Masks are additive (0 or -inf) and built here once, so no layer
converts a boolean mask again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .decode_lanes import DecodeLanes, LaneGroup
from .kv_arena import KVArena
from .kv_cache import PagedKVCache
from .lane_tier import LaneTier
from .plan import RowInput

# A gathered decode group holds rows at least this share of its longest row's length, so at
# most about half of what it gathers is padding; past MAX_DECODE_GROUPS the last takes the rest.
GROUP_MIN_SHARE = 0.5
MAX_DECODE_GROUPS = 4


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """Packed decode tokens offset..offset+n-1, attended as one batch: the rows holding lanes
    0..n-1 of one tier, or rows of similar length gathered from the pool."""

    offset: int  # index of its first token in the packed sequence
    mask: torch.Tensor  # [n, 1, 1, K] additive: 0 where row i has position k, else -inf
    tier: LaneTier | None = None  # read from this tier's lanes; None: gathered
    gather: torch.Tensor | None = None  # [2 * n * KVH * nb] long: arena block rows of the
    #                                     gathered rows' blocks

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def kv_len(self) -> int:
        """K: positions read per row (the longest row's)."""
        return int(self.mask.shape[-1])

    def read(self, layer: int, cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each `[n, KVH, K, Dh]`: a strided view of the lanes,
        or the rows' blocks gathered into the arena's scratch buffer."""
        if self.tier is not None:
            return self.tier.view(layer, self.size, self.kv_len)
        if self.gather is None:
            raise ValueError("a decode batch reads lanes or gathers blocks")
        return cache.gather(layer, self.gather, self.size, self.kv_len)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of consecutive tokens of one sequence in the packed step (a prefill chunk)."""

    offset: int  # index of its first token in the packed sequence
    start: int  # position of its first token in its sequence
    length: int  # n: its tokens in this step
    gather: torch.Tensor | None  # [2 * KVH * nb] arena block rows of positions 0..start+n-1;
    #                              None if start 0
    mask: torch.Tensor | None  # [n, start+n] additive: token i sees positions <= start+i;
    #                            None: causal

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class BlockFill:
    """Block rows to copy before the writes: pool blocks into lanes new this step."""

    dst: torch.Tensor  # [F] long: arena block rows in the lanes
    src: torch.Tensor  # [F] long: arena block rows in the pool


@dataclass(slots=True)
class PagedLayout:
    """Where each packed token of a forward lives; shared by all layers."""

    cache: PagedKVCache
    positions: torch.Tensor  # [T] long: position of each packed token in its sequence
    write_rows: torch.Tensor  # [M] long: arena rows the step's keys/values go to
    write_source: torch.Tensor | None  # [M] long: their rows in the step's `[2 * KVH * T, Dh]`
    #                                    keys then values; None: all of them, in order
    decode_order: list[int]  # packed decode token j is decode row decode_order[j]
    fill: BlockFill | None = None
    decode: list[DecodeBatch] = field(default_factory=list)  # every decode token, in order
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def arena(self) -> KVArena:
        return self.cache.arena

    @property
    def num_decode(self) -> int:
        """D: packed tokens 0..D-1 are the decode rows' tokens."""
        return len(self.decode_order)

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        decode: Sequence[RowInput],
        prefill: Sequence[RowInput],
        device: torch.device,
        lanes: DecodeLanes | None = None,
    ) -> PagedLayout:
        """Layout for the decode rows (one token each), then the prefill rows' chunks.

        With `lanes`, decode rows that get a lane read from it (`DecodeLanes.plan`,
        which records the lanes' new lengths: reset them if the step fails).
        """
        lane_groups = lanes.plan(decode) if lanes is not None else []
        in_lanes = {i for g in lane_groups for i in g.rows}
        gathered = _group_rows(decode, [i for i in range(len(decode)) if i not in in_lanes])
        order = [i for g in lane_groups for i in g.rows] + [i for m in gathered for i in m]
        packed = [decode[i] for i in order] + list(prefill)
        bs = cache.block_size
        positions: list[int] = []
        slots: list[int] = []
        for r in packed:
            span = range(r.start, r.start + len(r.input_ids))
            positions.extend(span)
            slots.extend(r.block_table[p // bs] * bs + p % bs for p in span)
        tokens = len(positions)  # T
        rows = [cache.write_rows(torch.tensor(slots, device=device)).reshape(-1)]  # [2*KVH*T]
        source: list[torch.Tensor] = []
        batches: list[DecodeBatch] = []
        offset = 0
        for g in lane_groups:
            starts = torch.tensor(g.starts, device=device)  # [w]
            rows.append(g.store.write_rows(starts).reshape(-1))  # [2 * KVH * w]
            source.append(_token_rows(cache, tokens, offset, g.width, device))
            mask = _length_mask(starts + 1, g.kv_len, cache.dtype)  # [w, 1, 1, K]
            batches.append(DecodeBatch(offset, mask, tier=g.store))
            offset += g.width
        for members in gathered:
            batches.append(_gathered(cache, decode, members, offset, device))
            offset += len(members)
        chunks = []
        for r in prefill:
            chunks.append(_chunk(cache, r, offset, device))
            offset += len(r.input_ids)
        if source:  # the pool's rows take every key and value, the lanes' their rows'
            source.insert(0, torch.arange(2 * cache.shape.kv_heads * tokens, device=device))
        return cls(
            cache=cache,
            positions=torch.tensor(positions, device=device),  # [T]
            write_rows=torch.cat(rows) if len(rows) > 1 else rows[0],  # [M]
            write_source=torch.cat(source) if source else None,  # [M]
            decode_order=order,
            fill=_fill(cache, lane_groups, device),
            decode=batches,
            chunks=chunks,
        )

    def store(self, layer: int, kv: torch.Tensor) -> None:
        """Write one layer's new keys and values `[2 * KVH, T, Dh]` (keys, then values) into
        the pool and the lanes, after filling the lanes new this step."""
        if self.fill is not None:
            self.arena.copy_blocks(layer, self.fill.dst, self.fill.src)
        self.arena.write(layer, self.write_rows, kv.view(-1, kv.shape[-1]), self.write_source)


def _token_rows(
    cache: PagedKVCache, tokens: int, offset: int, width: int, device: torch.device
) -> torch.Tensor:
    """Rows `[2 * KVH * w]` of packed tokens offset..offset+w-1 in the step's keys then values
    `[2 * KVH * T, Dh]`, in `[2, KVH, w]` order."""
    heads = torch.arange(2 * cache.shape.kv_heads, device=device)[:, None]  # [2KVH, 1]
    return (heads * tokens + torch.arange(offset, offset + width, device=device)).reshape(-1)


def _length_mask(lengths: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask `[n, 1, 1, K]`: 0 at positions < lengths[i], -inf past them."""
    visible = torch.arange(kv_len, device=lengths.device)[None, :] < lengths[:, None]  # [n, K]
    return _additive(visible, dtype).view(len(lengths), 1, 1, kv_len)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `visible`, -inf elsewhere, in the model's dtype (what SDPA makes of a
    boolean mask, once per step instead of once per layer)."""
    zeros = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return zeros.masked_fill_(~visible, -torch.inf)


def _fill(
    cache: PagedKVCache, groups: Sequence[LaneGroup], device: torch.device
) -> BlockFill | None:
    """The pool-to-lane block copies of rows new to their lanes: their positions
    0..start-1, in whole blocks (what a block holds past start is overwritten or masked)."""
    dst: list[int] = []
    tables: list[list[int]] = []
    for g in groups:
        for lane, r in g.fills:
            blocks = _blocks_for(r.start, cache.block_size)
            dst.extend(g.store.block_rows(lane, blocks))
            tables.append(list(r.block_table[:blocks]))
    if not dst:
        return None
    src = [cache.block_rows(torch.tensor([t], device=device)).reshape(-1) for t in tables]
    return BlockFill(torch.tensor(dst, device=device), torch.cat(src))


def _blocks_for(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


def _group_rows(decode: Sequence[RowInput], rows: list[int]) -> list[list[int]]:
    """Decode rows `rows` (indices) in groups of similar length, the longest rows' first."""
    order = sorted(rows, key=lambda i: decode[i].start, reverse=True)
    groups: list[list[int]] = []
    for i in order:
        longest = decode[groups[-1][0]].start + 1 if groups else 0
        if groups and (
            decode[i].start + 1 >= GROUP_MIN_SHARE * longest or len(groups) == MAX_DECODE_GROUPS
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


def _gathered(
    cache: PagedKVCache,
    decode: Sequence[RowInput],
    rows: list[int],
    offset: int,
    device: torch.device,
) -> DecodeBatch:
    """The batch of decode rows `rows`, gathered: their blocks' rows and length mask."""
    lengths = [decode[i].start + 1 for i in rows]  # the decode token included
    kv_len = max(lengths)  # K
    width = _blocks_for(kv_len, cache.block_size)  # nb
    tables = []
    for i, n in zip(rows, lengths, strict=True):
        own = list(decode[i].block_table[: _blocks_for(n, cache.block_size)])
        tables.append(own + [own[0]] * (width - len(own)))  # padding: masked below
    gather = cache.block_rows(torch.tensor(tables, device=device)).reshape(-1)
    mask = _length_mask(torch.tensor(lengths, device=device), kv_len, cache.dtype)
    return DecodeBatch(offset, mask, gather=gather)


def _chunk(cache: PagedKVCache, r: RowInput, offset: int, device: torch.device) -> Chunk:
    n = len(r.input_ids)
    if r.start == 0:
        return Chunk(offset, 0, n, gather=None, mask=None)
    end = r.start + n
    table = list(r.block_table[: _blocks_for(end, cache.block_size)])
    gather = cache.block_rows(torch.tensor([table], device=device)).reshape(-1)
    q_pos = torch.arange(r.start, end, device=device)  # [n]
    visible = torch.arange(end, device=device)[None, :] <= q_pos[:, None]  # [n, start+n]
    return Chunk(offset, r.start, n, gather=gather, mask=_additive(visible, cache.dtype))
