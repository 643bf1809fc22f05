"""What the engine streams back for a request: token events, then one finish event per sample.

A request asking for `n` samples streams the events of samples 0..n-1
interleaved, each tagged with its `index`; it has ended when every sample has
sent its finish event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..api.outcome import FinishReason, TokenLogprob, Usage
from ..api.tools import ToolCall


class Cause(enum.Enum):
    """Who ended a cancelled request when its client did not (it decides the status code)."""

    DEADLINE = "deadline exceeded"
    SHUTDOWN = "server shutting down"
    SLOW_READER = "the client is reading too slowly"


@dataclass(frozen=True, slots=True)
class Ending:
    """How a request that is asked to end finishes."""

    reason: FinishReason = FinishReason.CANCELLED
    message: str | None = None
    cause: Cause | None = None


CANCELLED = Ending()  # by its client
DEADLINE_EXCEEDED = Ending(FinishReason.CANCELLED, Cause.DEADLINE.value, Cause.DEADLINE)
SHUTTING_DOWN = Ending(FinishReason.CANCELLED, Cause.SHUTDOWN.value, Cause.SHUTDOWN)
SLOW_READER = Ending(FinishReason.CANCELLED, Cause.SLOW_READER.value, Cause.SLOW_READER)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """Tokens generated this step and the text they released."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str  # newly released text; "" while it is held back (partial UTF-8 or stop string)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when asked for
    index: int = 0  # the sample (0..n-1) the tokens belong to


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """The terminal event of one sample of a request (of the request, when n = 1)."""

    request_id: str
    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None  # the matched stop string, for STOP_SEQUENCE
    message: str | None = None  # what went wrong, for ERROR and some CANCELLED
    cause: Cause | None = None  # for CANCELLED by the deadline or shutdown
    index: int = 0  # the sample (0..n-1) that ended
    tool_calls: tuple[ToolCall, ...] = ()  # the calls it made, parsed from its output


Event = TokenEvent | FinishEvent
