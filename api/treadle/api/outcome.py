"""How a request ended and what it cost: finish reasons, usage and logprobs."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    """Why a request ended: every accepted request ends with exactly one.

    The names are the wire's FinishReason names without their `FINISH_REASON_` prefix.
    """

    LENGTH = "length"  # max_new_tokens generated
    EOS = "eos"  # the model produced one of its EOS tokens
    STOP_SEQUENCE = "stop_sequence"  # a stop string appeared in the text
    STOP_TOKEN = "stop_token"  # one of the request's stop token ids was generated
    TIME_LIMIT = "time_limit"  # max_time elapsed since the request started generating
    STOP_CRITERION = "stop_criterion"  # a custom stopping-criterion plugin fired
    CANCELLED = "cancelled"  # aborted by the client, its deadline, or server shutdown
    ERROR = "error"  # this request failed; the others went on

    @property
    def wire_name(self) -> str:
        """The name of the wire's enum value (`FINISH_REASON_LENGTH`, ...)."""
        return f"FINISH_REASON_{self.name}"

    @classmethod
    def from_wire_name(cls, name: str) -> FinishReason:
        return cls[name.removeprefix("FINISH_REASON_")]


@dataclass(frozen=True, slots=True)
class Usage:
    """Counts and timings of a finished request."""

    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache
    generated_tokens: int
    queue_seconds: float  # arrival to admission (0 if never admitted)
    time_to_first_token_seconds: (
        float | None
    )  # arrival to first token; None (0 on the wire) if none
    total_seconds: float  # arrival to finish


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Log-probability of a generated token and of the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first
