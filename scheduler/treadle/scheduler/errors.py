"""Typed errors the engine raises to its callers.

Each carries what a client needs to fix its request; the gRPC frontend maps
them to status codes in one place (no other module decides a status code).
"""

from __future__ import annotations

from ..worker.error_text import clipped, log_internal_error, shown

__all__ = [
    "MAX_MESSAGE_CHARS",
    "DuplicateRequestError",
    "EngineUnavailableError",
    "QueueFullError",
    "SessionLimitError",
    "TreadleError",
    "ValidationError",
    "log_internal_error",
    "shown",
]

# A refusal's message travels twice (status message and BadRequest description),
# in gRPC metadata: whatever a client value made of it, it is cut to this length.
MAX_MESSAGE_CHARS = 512


class TreadleError(Exception):
    """Base of the errors the engine reports to callers."""


class ValidationError(TreadleError, ValueError):
    """A request field is invalid. The message starts with the field's name and is at
    most MAX_MESSAGE_CHARS long; show client values in it through `shown`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(clipped(f"{field}: {message}", MAX_MESSAGE_CHARS))
        self.field = field


class QueueFullError(TreadleError):
    """The waiting queue is at its limit; the client may retry later."""


class SessionLimitError(TreadleError):
    """A Session already has its limit of requests in flight; retry once one finishes."""


class EngineUnavailableError(TreadleError):
    """The engine is not accepting requests (starting, draining or stopped)."""


class DuplicateRequestError(TreadleError):
    """A request with the same id is already in flight."""
