"""The one place where errors and outcomes become gRPC status codes."""

from __future__ import annotations

import grpc

from .errors import (
    DuplicateRequestError,
    EngineUnavailableError,
    QueueFullError,
    ValidationError,
)
from .events import Cause, FinishEvent, FinishReason

_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
)


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a refused request gets; anything unexpected is INTERNAL."""
    for kind, code in _BY_ERROR:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def finish_code(event: FinishEvent) -> grpc.StatusCode:
    """The status code reported inside a Finish that carries an error or a cancellation."""
    if event.reason is FinishReason.ERROR:
        return grpc.StatusCode.INTERNAL
    if event.reason is FinishReason.CANCELLED:
        if event.cause is Cause.DEADLINE:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        if event.cause is Cause.SHUTDOWN:
            return grpc.StatusCode.UNAVAILABLE
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK


def code_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])
