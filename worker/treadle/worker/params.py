"""Per-request generation parameters the worker applies to its row.

Plain, frozen data: the frontend builds one per request after validation, the
scheduler carries it on the request, the worker turns the rows' parameters
into per-row tensors every step. Defaults change nothing: greedy choice and no
processor enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plugins.base import PluginBinding


@dataclass(frozen=True, slots=True)
class LogprobsParams:
    """Which log-probabilities to return for each generated token."""

    top_n: int = 0  # how many alternatives besides the chosen token (0 = chosen only)
    processed: bool = False  # False: raw model distribution; True: after processors/warpers


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Logits processing and token choice for one request.

    Processors (always applied, in transformers' order): logit_bias,
    repetition_penalty, presence/frequency penalty, no_repeat_ngram_size,
    bad_words_ids, min_new_tokens, allowed_token_ids, then the request's
    plugins. Warpers (only when sampling, temperature > 0): temperature,
    top_k, top_p, min_p, typical_p.
    """

    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    typical_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; over prompt and generated tokens
    presence_penalty: float = 0.0  # 0 = off; over generated tokens (OpenAI semantics)
    frequency_penalty: float = 0.0  # 0 = off; over generated tokens (OpenAI semantics)
    no_repeat_ngram_size: int = 0  # 0 = off; over prompt and generated tokens
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never to complete
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added bias)
    allowed_token_ids: tuple[int, ...] = ()  # empty = every token allowed
    min_new_tokens: int = 0  # `min_tokens_suppressed` are masked until this many were generated
    min_tokens_suppressed: tuple[int, ...] = ()  # EOS and stop token ids, filled by the frontend
    seed: int | None = None  # sampling seed: same seed, same tokens, whatever shares the batch
    logprobs: LogprobsParams | None = None  # None = no logprobs
    plugins: tuple[PluginBinding, ...] = field(default=(), compare=False)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
