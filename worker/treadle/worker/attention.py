"""Attention over the paged KV pool, registered with transformers' AttentionInterface.

A step runs the model once on a packed sequence of T tokens (`input_ids`
`[1, T]`): first one token for each decoding row 0..D-1, then the chunk of
each prefilling row. transformers computes the projections, RoPE (from our
per-token `position_ids`) and everything else of the model; it calls this
function in place of its own attention with the packed query/key/value and
our `PagedLayout` (passed through the model's `**kwargs` as `treadle_layout`).
The function writes the new keys/values into their blocks, then attends:

- decode tokens of rows that hold a decode lane (`decode_lanes.py`) in one
  batch per lane tier over the tier's strided view, nothing gathered;
- the other decode tokens in a few batches of rows of similar length (`DecodeGroup`):
  query `[g, KVH, rep, Dh]` (grouped heads folded into the query length)
  against each row's blocks gathered into `[g, KVH, K, Dh]` (K: the group's
  longest row; shorter rows padded and masked). Grouping bounds the padding
  that is gathered and attended: the gather copies memory, so it costs what
  it reads;
- each prefill chunk on its own: a chunk from position 0 attends to its own
  keys, plain causal; a chunk further on gathers its positions 0..start+n-1
  and uses the continuation mask.

The layout (every index and mask) is built once per step and shared by all
layers. No model is re-implemented; any decoder-only model whose attention
goes through `ALL_ATTENTION_FUNCTIONS` runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .decode_lanes import DecodeLanes, LaneGroup
from .kv_cache import PagedKVCache
from .plan import RowInput

ATTENTION_NAME = "treadle_paged"


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of consecutive tokens of one sequence in the packed step (a prefill chunk)."""

    offset: int  # index of its first token in the packed sequence
    start: int  # position of its first token in its sequence
    length: int  # n: its tokens in this step
    gather: torch.Tensor | None  # [KVH * nb] pool rows of positions 0..start+n-1; None if start 0
    mask: torch.Tensor | None  # [n, start+n] bool: token i sees positions <= start+i; None: causal

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decode rows of similar length, attended as one batch."""

    rows: torch.Tensor  # [g] long: the group's rows, as indices among the decode rows
    gather: torch.Tensor  # [g * KVH * nb] long: pool rows of their blocks
    mask: torch.Tensor  # [g, 1, 1, K] bool: position k visible to the group's row i

    @property
    def size(self) -> int:
        return int(self.rows.numel())

    @property
    def kv_len(self) -> int:
        """K: positions the group reads (its longest row's)."""
        return int(self.mask.shape[-1])


# A decode group holds rows at least this share of its longest row's length, so at most
# about half of what it gathers is padding; past MAX_DECODE_GROUPS the last takes the rest.
GROUP_MIN_SHARE = 0.5
MAX_DECODE_GROUPS = 4


@dataclass(slots=True)
class PagedLayout:
    """Where each packed token of a forward lives in the pool; shared by all layers."""

    cache: PagedKVCache
    positions: torch.Tensor  # [T] long: position of each packed token in its sequence
    write_index: torch.Tensor  # [KVH * T] long: pool rows the step's keys/values go to
    num_decode: int  # D: packed tokens 0..D-1 are the decode rows' tokens
    lane_groups: list[LaneGroup] = field(default_factory=list)  # decode rows read from lanes;
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # with these, all of 0..D-1
    chunks: list[Chunk] = field(default_factory=list)

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
        bs = cache.block_size
        positions: list[int] = []
        slots: list[int] = []
        for r in (*decode, *prefill):
            span = range(r.start, r.start + len(r.input_ids))
            positions.extend(span)
            slots.extend(r.block_table[p // bs] * bs + p % bs for p in span)
        lane_groups = lanes.plan(cache, decode, device) if lanes is not None else []
        in_lanes = {i for g in lane_groups for i in g.rows.tolist()}
        gathered = [i for i in range(len(decode)) if i not in in_lanes]
        groups = [_decode_group(cache, decode, g, device) for g in _group_rows(decode, gathered)]
        chunks: list[Chunk] = []
        offset = len(decode)
        for r in prefill:
            chunks.append(_chunk(cache, r, offset, device))
            offset += len(r.input_ids)
        return cls(
            cache=cache,
            positions=torch.tensor(positions, device=device),  # [T]
            write_index=cache.write_index(torch.tensor(slots, device=device)),  # [KVH * T]
            num_decode=len(decode),
            lane_groups=lane_groups,
            decode_groups=groups,
            chunks=chunks,
        )


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
    return [sorted(g) for g in groups]  # in row order: one group of all rows needs no reorder


def _decode_group(
    cache: PagedKVCache, decode: Sequence[RowInput], rows: list[int], device: torch.device
) -> DecodeGroup:
    """The gather index of `rows`' blocks and their length mask."""
    lengths = [decode[i].start + 1 for i in rows]  # the decode token included
    kv_len = max(lengths)  # K
    width = _blocks_for(kv_len, cache.block_size)  # nb
    tables = []
    for i, n in zip(rows, lengths, strict=True):
        own = list(decode[i].block_table[: _blocks_for(n, cache.block_size)])
        tables.append(own + [own[0]] * (width - len(own)))  # padding: masked below
    gather = cache.gather_index(torch.tensor(tables, device=device))  # [g * KVH * nb]
    lens = torch.tensor(lengths, device=device)  # [g]
    mask = torch.arange(kv_len, device=device)[None, :] < lens[:, None]  # [g, K]
    return DecodeGroup(
        rows=torch.tensor(rows, device=device),
        gather=gather,
        mask=mask.view(len(rows), 1, 1, kv_len),  # [g, 1, 1, K]
    )


def _chunk(cache: PagedKVCache, r: RowInput, offset: int, device: torch.device) -> Chunk:
    n = len(r.input_ids)
    if r.start == 0:
        return Chunk(offset, 0, n, gather=None, mask=None)
    end = r.start + n
    table = list(r.block_table[: _blocks_for(end, cache.block_size)])
    gather = cache.gather_index(torch.tensor([table], device=device))  # [KVH * nb]
    q_pos = torch.arange(r.start, end, device=device)  # [n]
    mask = torch.arange(end, device=device)[None, :] <= q_pos[:, None]  # [n, start+n]
    return Chunk(offset, r.start, n, gather=gather, mask=mask)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    treadle_layout: PagedLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention hook: query `[1, H, T, Dh]`, key/value `[1, KVH, T, Dh]`.

    Writes the T tokens' keys/values into the pool, then returns the attention
    output `[1, T, H, Dh]`.
    """
    layout = treadle_layout
    if layout is None:
        raise RuntimeError(
            f"attention '{ATTENTION_NAME}' runs only inside a treadle step (no layout given)"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx: cannot place its KV")
    layout.cache.write(layer, layout.write_index, key[0], value[0])
    for group in layout.lane_groups:
        _write_lanes(group, layout.cache, layer, key[0], value[0])
    q = query[0]  # [H, T, Dh]
    outputs: list[torch.Tensor] = []
    if layout.num_decode:
        outputs.append(_attend_decode(layout, layer, q, scaling))  # [D, H, Dh]
    for c in layout.chunks:
        outputs.append(_attend_chunk(layout, layer, c, q, key, value, scaling))  # [n, H, Dh]
    merged = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)  # [T, H, Dh]
    return merged.unsqueeze(0), None


def _write_lanes(
    group: LaneGroup,
    cache: PagedKVCache,
    layer: int,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Fill the lanes new this step from the pool, then append the lane rows' new KV;
    keys/values: the step's `[KVH, T, Dh]` (decode rows first)."""
    if group.fill is not None:
        group.store.fill(layer, cache, group.fill)
    group.store.write(layer, group, keys[:, group.rows], values[:, group.rows])  # [KVH, m, Dh]


def _attend_decode(
    layout: PagedLayout, layer: int, q: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """The decode rows, one batch per group; returns `[D, H, Dh]` in decode-row order."""
    d = layout.num_decode
    heads, _, head_dim = q.shape
    kv_heads = layout.cache.shape.kv_heads
    # Grouped heads share their KV head: fold the group into the query length.
    q_dec = q[:, :d].transpose(0, 1).reshape(d, kv_heads, heads // kv_heads, head_dim)
    if not layout.lane_groups and len(layout.decode_groups) == 1:  # one batch in row order
        return _attend_group(layout, layer, layout.decode_groups[0], q_dec, scaling)
    out = q.new_empty(d, heads, head_dim)  # [D, H, Dh]
    for lanes in layout.lane_groups:
        out[lanes.rows] = _attend_lanes(lanes, layer, q_dec[lanes.rows], scaling)
    for group in layout.decode_groups:
        out[group.rows] = _attend_group(layout, layer, group, q_dec[group.rows], scaling)
    return out


def _attend_lanes(
    group: LaneGroup,
    layer: int,
    q: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One tier's lane rows over its lanes' view; q: their `[w, KVH, rep, Dh]` in lane
    order. Returns `[w, H, Dh]`."""
    keys, values = group.store.view(layer, group)  # [w, KVH, K, Dh]
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=group.mask, scale=scaling
    )  # [w, KVH, rep, Dh]
    return out.reshape(group.width, -1, q.shape[-1])  # [w, H, Dh]


def _attend_group(
    layout: PagedLayout,
    layer: int,
    group: DecodeGroup,
    q: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One decode group: query `[g, KVH, rep, Dh]`; returns `[g, H, Dh]`."""
    keys, values = layout.cache.gather(layer, group.gather, group.size, group.kv_len)
    out = F.scaled_dot_product_attention(
        q,  # [g, KVH, rep, Dh]
        keys,  # [g, KVH, K, Dh]
        values,
        attn_mask=group.mask,  # [g, 1, 1, K]
        scale=scaling,
    )
    return out.reshape(group.size, -1, q.shape[-1])  # [g, H, Dh]


def _attend_chunk(
    layout: PagedLayout,
    layer: int,
    c: Chunk,
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One prefill chunk; returns `[n, H, Dh]`."""
    q_seg = q[:, c.offset : c.offset + c.length].unsqueeze(0)  # [1, H, n, Dh]
    if c.gather is None:  # from position 0: its own keys are all it sees
        keys = key[:, :, c.offset : c.offset + c.length]  # [1, KVH, n, Dh]
        values = value[:, :, c.offset : c.offset + c.length]
    else:
        keys, values = layout.cache.gather(layer, c.gather, 1, c.end)  # [1, KVH, start+n, Dh]
    out = F.scaled_dot_product_attention(
        q_seg,
        keys,
        values,
        attn_mask=c.mask,
        is_causal=c.mask is None,
        scale=scaling,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)  # [n, H, Dh]


def install(model: Any) -> None:
    """Register the paged attention with transformers and switch `model` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    setter = getattr(model, "set_attn_implementation", None)
    vision = getattr(model.config, "vision_config", None) is not None
    if callable(setter):  # a vision-language model's vision tower keeps its own attention
        setter({"text_config": ATTENTION_NAME} if vision else ATTENTION_NAME)
    else:  # older transformers
        model.config.get_text_config()._attn_implementation = ATTENTION_NAME
