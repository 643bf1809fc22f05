"""Attention over the slot KV cache, registered with transformers' AttentionInterface.

A step runs the model once on a packed sequence of T tokens (`input_ids`
`[1, T]`): first one token for each decoding row 0..D-1, then the prompt of
each prefilling row. transformers computes the projections, RoPE (from our
per-token `position_ids`) and everything else of the model; it calls this
function in place of its own attention with the packed query/key/value and
our `SlotLayout` (passed through the model's `**kwargs` as `treadle_layout`).
The function writes the new keys/values into their rows and attends:

- decode tokens as one batch: query `[D, KVH, rep, Dh]` against the first D
  rows of the cache up to the longest of them, with a per-row length mask;
- each prefill segment on its own, causal, against its row.

No model is re-implemented; any decoder-only model whose attention goes
through `ALL_ATTENTION_FUNCTIONS` runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .kv_cache import SlotKVCache

ATTENTION_NAME = "treadle_slots"


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of consecutive tokens of one row in the packed sequence (a prefill)."""

    row: int
    start: int  # position of the first token in its sequence
    length: int  # tokens in this step
    offset: int  # index of the first token in the packed sequence


@dataclass(slots=True)
class SlotLayout:
    """Where each packed token of a forward lives in the cache; shared by all layers."""

    cache: SlotKVCache
    rows: torch.Tensor  # [T] long: KV row of each packed token
    positions: torch.Tensor  # [T] long: position of each packed token in its sequence
    num_decode: int  # D: packed tokens 0..D-1 are the decode tokens of rows 0..D-1
    decode_mask: torch.Tensor | None  # [D, 1, 1, K] bool: key position k visible to row d
    segments: list[Segment] = field(default_factory=list)
    segment_masks: list[torch.Tensor | None] = field(default_factory=list)  # one per segment

    @property
    def decode_kv_len(self) -> int:
        """K: how many cache positions the decode batch reads."""
        return 0 if self.decode_mask is None else int(self.decode_mask.shape[-1])

    @classmethod
    def build(
        cls,
        cache: SlotKVCache,
        decode_positions: list[int],
        segments: list[Segment],
        device: torch.device,
    ) -> SlotLayout:
        """Layout for D decode tokens (row d at `decode_positions[d]`) then the segments."""
        d = len(decode_positions)
        rows = list(range(d))
        positions = list(decode_positions)
        for s in segments:
            rows.extend([s.row] * s.length)
            positions.extend(range(s.start, s.start + s.length))
        decode_mask = None
        if d:
            pos = torch.tensor(decode_positions, device=device)  # [D]
            kv_len = int(max(decode_positions)) + 1
            decode_mask = torch.arange(kv_len, device=device)[None, :] <= pos[:, None]  # [D, K]
            decode_mask = decode_mask.view(d, 1, 1, kv_len)
        return cls(
            cache=cache,
            rows=torch.tensor(rows, device=device),
            positions=torch.tensor(positions, device=device),
            num_decode=d,
            decode_mask=decode_mask,
            segments=segments,
            segment_masks=[_continuation_mask(s, device) for s in segments],
        )


def _continuation_mask(s: Segment, device: torch.device) -> torch.Tensor | None:
    """None for a prompt from position 0 (plain causal); for a continuation
    `[n, start+n]` bool: token i sees positions <= start + i. Built once per step."""
    if s.start == 0:
        return None
    end = s.start + s.length
    q_pos = torch.arange(s.start, end, device=device)  # [n]
    return torch.arange(end, device=device)[None, :] <= q_pos[:, None]  # [n, start+n]


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    treadle_layout: SlotLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention hook: query `[1, H, T, Dh]`, key/value `[1, KVH, T, Dh]`.

    Returns the attention output `[1, T, H, Dh]`.
    """
    layout = treadle_layout
    if layout is None:
        raise RuntimeError(
            f"attention '{ATTENTION_NAME}' runs only inside a treadle step (no layout given)"
        )
    layer = int(getattr(module, "layer_idx", 0))
    cache = layout.cache
    # Store the new keys/values in their rows first: [1, KVH, T, Dh] -> [T, KVH, Dh].
    cache.write(
        layer, layout.rows, layout.positions, key[0].transpose(0, 1), value[0].transpose(0, 1)
    )
    k_buf, v_buf = cache.layer(layer)  # [R, KVH, max_len, Dh]
    q = query[0]  # [H, T, Dh]
    heads, _, head_dim = q.shape
    kv_heads = k_buf.shape[1]
    outputs: list[torch.Tensor] = []

    d = layout.num_decode
    if d:
        kv_len = layout.decode_kv_len
        # Grouped heads share their KV head: fold the group into the query length.
        q_dec = q[:, :d].transpose(0, 1).reshape(d, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(
            q_dec,  # [D, KVH, rep, Dh]
            k_buf[:d, :, :kv_len],  # [D, KVH, K, Dh]
            v_buf[:d, :, :kv_len],
            attn_mask=layout.decode_mask,  # [D, 1, 1, K]
            scale=scaling,
        )
        outputs.append(out.reshape(d, heads, head_dim))  # [D, H, Dh]

    for s, mask in zip(layout.segments, layout.segment_masks, strict=True):
        end = s.start + s.length
        q_seg = q[:, s.offset : s.offset + s.length].unsqueeze(0)  # [1, H, n, Dh]
        k_seg = k_buf[s.row : s.row + 1, :, :end]  # [1, KVH, start+n, Dh]
        v_seg = v_buf[s.row : s.row + 1, :, :end]
        out = F.scaled_dot_product_attention(
            q_seg,
            k_seg,
            v_seg,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=True,
        )
        outputs.append(out[0].transpose(0, 1))  # [n, H, Dh]

    merged = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)  # [T, H, Dh]
    return merged.unsqueeze(0), None


def install(model: Any) -> None:
    """Register the slot attention with transformers and switch `model` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(ATTENTION_NAME)
    else:  # older transformers
        model.config._attn_implementation = ATTENTION_NAME
