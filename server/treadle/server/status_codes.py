"""The one place where errors and outcomes become gRPC status codes and error details.

A refused call carries, besides its code and readable message, the standard
`google.rpc` details (grpcio-status): `BadRequest` with the field violation
for INVALID_ARGUMENT, `RetryInfo` with a retry delay for RESOURCE_EXHAUSTED
and UNAVAILABLE (a client may retry those; not the others).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..api.outcome import FinishReason
from ..scheduler.errors import (
    DuplicateRequestError,
    EngineUnavailableError,
    QueueFullError,
    SessionLimitError,
    ValidationError,
)
from ..scheduler.events import Cause, FinishEvent

_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SessionLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
)

# Seconds a client is told to wait before retrying (RetryInfo.retry_delay).
RETRY_DELAY_S: Mapping[grpc.StatusCode, float] = MappingProxyType(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED: 0.5,  # a queue slot frees within a few steps
        grpc.StatusCode.UNAVAILABLE: 1.0,  # loading or draining: another replica, or later
    }
)

_BY_CAUSE: dict[Cause, grpc.StatusCode] = {
    Cause.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cause.SHUTDOWN: grpc.StatusCode.UNAVAILABLE,
    Cause.SLOW_READER: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


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
        if event.cause is None:
            return grpc.StatusCode.CANCELLED
        return _BY_CAUSE.get(event.cause, grpc.StatusCode.CANCELLED)
    return grpc.StatusCode.OK


def code_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def rich_status(code: grpc.StatusCode, message: str, field: str | None = None) -> grpc.Status:
    """A call status with its `google.rpc` details: `BadRequest` naming `field`, or
    `RetryInfo` for the retryable codes (see RETRY_DELAY_S)."""
    details: list[any_pb2.Any] = []
    if field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=message.removeprefix(f"{field}: ")
        )
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    if code in RETRY_DELAY_S:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(RETRY_DELAY_S[code] * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=code_number(code), message=message, details=details)
    return rpc_status.to_status(status)


def _packed(message: error_details_pb2.BadRequest | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
