"""How a model's prompt tokens cost: the attention span the scheduler budgets chunks with."""

from __future__ import annotations

from typing import Any

from torch import nn

# Attention runs at about this share of a matrix product's arithmetic rate (SDPA's flash
# kernel against the model's linear layers; measured on the 2-core CPU: a chunk of 80
# tokens costs 1.35 ms a token at position 0 and 0.66 us more per position before it).
ATTENTION_EFFICIENCY = 2 / 3


def attention_span(model: Any) -> int | None:
    """Context length at which one token's attention costs as much as the rest of its
    forward: the FLOPs of one decoder layer's linear weights per token (2 per weight)
    over the attention's per position (4 per query head dimension: scores and values),
    times ATTENTION_EFFICIENCY. None when the model's layers cannot be found.

    SmolLM2-135M: 3.54M weights a layer, 9 heads of 64: 2048 positions.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not layers:
        return None
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    weights = sum(m.weight.numel() for m in layers[0].modules() if isinstance(m, nn.Linear))
    if not weights:
        return None
    return max(1, round(2 * weights / (4 * heads * head_dim) * ATTENTION_EFFICIENCY))
