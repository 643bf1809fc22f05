"""What the SDK returns: typed events, results and model information."""

from __future__ import annotations

from dataclasses import dataclass

from treadle.api.outcome import FinishReason, TokenLogprob, Usage


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Tokens generated in one step and the text they released."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of a request: always the last event."""

    request_id: str
    reason: FinishReason
    usage: Usage
    stop_sequence: str = ""
    error_code: int = 0  # gRPC status code number, for errors and some cancellations
    error_message: str = ""


Event = TokenChunk | Finish


@dataclass(frozen=True, slots=True)
class Result:
    """A whole generation."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish: Finish
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def reason(self) -> FinishReason:
        return self.finish.reason

    @property
    def usage(self) -> Usage:
        return self.finish.usage


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model and the limits its server enforces."""

    model: str
    context_length: int
    max_total_tokens: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_batch_rows: int
    kv_cache_tokens: int  # positions of the KV cache pool
    default_max_new_tokens: int
    max_stop_strings: int
    max_plugins: int
    max_top_logprobs: int
    max_waiting: int
    max_request_bytes: int
    plugins: tuple[str, ...]
    has_chat_template: bool
