"""What the SDK returns: typed events, results and model information."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    """Why a request ended (the wire's FinishReason, without its prefix).

    The engine uses the same enum: every accepted request ends with exactly one.
    """

    LENGTH = "length"  # max_new_tokens generated
    EOS = "eos"  # the model produced one of its EOS tokens
    STOP_SEQUENCE = "stop_sequence"  # a stop string appeared in the text
    STOP_TOKEN = "stop_token"  # one of the request's stop token ids was generated
    TIME_LIMIT = "time_limit"  # max_time elapsed since the request started generating
    STOP_CRITERION = "stop_criterion"  # a custom stopping-criterion plugin fired
    CANCELLED = "cancelled"  # aborted by the client, its deadline, or server shutdown
    ERROR = "error"  # this request failed; the others went on


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


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
    default_max_new_tokens: int
    max_stop_strings: int
    max_plugins: int
    max_top_logprobs: int
    max_waiting: int
    max_request_bytes: int
    plugins: tuple[str, ...]
    has_chat_template: bool
