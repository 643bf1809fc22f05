"""Attention over the paged KV pool, registered with transformers' AttentionInterface.

A step runs the model once on a packed sequence of T tokens (`input_ids`
`[1, T]`): the decode rows' tokens in the layout's reading order, then the
chunk of each prefilling row (`layout.py`). transformers computes the
projections, RoPE (from our per-token `position_ids`) and everything else of
the model; it calls this function in place of its own attention with the
packed query/key/value and our `PagedLayout` (passed through the model's
`**kwargs` as `treadle_layout`). The function writes the new keys/values into
the pool and the decode lanes (one `index_put_` a layer), then attends, each
batch over a contiguous run of the packed queries:

- decode tokens of rows that hold a decode lane (`decode_lanes.py`), one
  batch per lane tier, over the tier's strided view, nothing gathered;
- the other decode tokens in a few batches of rows of similar length:
  query `[g, KVH, rep, Dh]` (grouped heads folded into the query length)
  against each row's blocks gathered into `[g, KVH, K, Dh]` (K: the group's
  longest row; shorter rows padded and masked). Grouping bounds the padding
  that is gathered and attended: the gather copies memory, so it costs what
  it reads;
- each prefill chunk on its own: a chunk from position 0 attends to its own
  keys, plain causal; a chunk further on gathers its positions 0..start+n-1
  and uses the continuation mask.

The outputs are concatenated in packed order. No model is re-implemented; any
decoder-only model whose attention goes through `ALL_ATTENTION_FUNCTIONS` runs
unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .layout import Chunk, PagedLayout

ATTENTION_NAME = "treadle_paged"


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

    Writes the T tokens' keys/values into the pool (and the lanes), then returns
    the attention output `[1, T, H, Dh]`.
    """
    layout = treadle_layout
    if layout is None:
        raise RuntimeError(
            f"attention '{ATTENTION_NAME}' runs only inside a treadle step (no layout given)"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx: cannot place its KV")
    layout.store(layer, torch.cat((key[0], value[0])))  # [2 * KVH, T, Dh]
    q = query[0]  # [H, T, Dh]
    outputs: list[torch.Tensor] = []
    if layout.num_decode:
        outputs.extend(_attend_decode(layout, layer, q, scaling))  # [D, H, Dh] in runs
    for c in layout.chunks:
        outputs.append(_attend_chunk(layout, layer, c, q, key, value, scaling))  # [n, H, Dh]
    merged = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)  # [T, H, Dh]
    return merged.unsqueeze(0), None


def _attend_decode(
    layout: PagedLayout, layer: int, q: torch.Tensor, scaling: float | None
) -> list[torch.Tensor]:
    """The decode tokens, one batch per lane tier and per gathered group; returns their
    outputs `[n, H, Dh]` in packed order."""
    d = layout.num_decode
    heads, _, head_dim = q.shape
    kv_heads = layout.cache.shape.kv_heads
    # Grouped heads share their KV head: fold the group into the query length.
    q_dec = q[:, :d].transpose(0, 1).reshape(d, kv_heads, heads // kv_heads, head_dim)
    out: list[torch.Tensor] = []
    for batch in layout.decode:
        keys, values = batch.read(layer, layout.cache)  # [n, KVH, K, Dh] each
        span = q_dec[batch.offset : batch.offset + batch.size]  # [n, KVH, rep, Dh]
        out.append(_attend(span, keys, values, batch.mask, scaling))
    return out


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One decode batch: query `[n, KVH, rep, Dh]` over keys/values `[n, KVH, K, Dh]`
    with an additive mask `[n, 1, 1, K]`; returns `[n, H, Dh]`."""
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(q.shape[0], -1, q.shape[-1])  # [n, H, Dh]


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
