"""What a frontend may read of an engine: the model and the limits it enforces.

Frontends (the gRPC service, metrics, the `serve` command) see the engine
through `Engine.info` and its live counters, never through its parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api.limits import RequestLimits


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """The served model and the limits of the engine serving it."""

    model: str  # the model's name, as loaded
    context_length: int  # positions the model supports
    max_total_tokens: int  # prompt + generated tokens one request may hold
    vocab_size: int  # width of the model's logits
    eos_token_ids: tuple[int, ...]  # every id that ends generation
    max_batch_rows: int  # requests running at once
    kv_cache_tokens: int  # positions the KV pool holds, all requests together
    block_size: int  # positions per KV block
    max_waiting: int  # accepted requests waiting for a row; more are refused
    max_prompt_chars: int  # characters of a prompt or chat, checked before tokenizing
    plugins: tuple[str, ...]  # names of the registered plugins, sorted
    has_chat_template: bool  # whether chat input is accepted
    accepts_images: bool  # whether chat messages may hold images (a vision-language model)
    response_format_types: tuple[str, ...]  # accepted response_format types; () if none
    limits: RequestLimits  # the per-request limits
