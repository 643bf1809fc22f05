"""Typed exceptions of the SDK, mapped from gRPC status codes in one place.

A server error may carry structured details (`grpc-status-details-bin`, a
`google.rpc.Status`): `BadRequest` field violations name the refused field,
`RetryInfo` says when to try again. The exceptions read both from there,
never from the message text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


class TreadleClientError(Exception):
    """Base of every SDK error.

    `code` is the gRPC status (None for checks made before sending), `message`
    the server's text, `field` the wire field refused (from the error's
    details, or the client-side check; None when unknown), `retry_after` the
    seconds the server asked to wait before retrying (RetryInfo; None when it
    did not say). `retryable` tells whether trying the same call again may pass.
    """

    retryable = False

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode | None = None,
        *,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field
        self.retry_after = retry_after


class InvalidArgument(TreadleClientError, ValueError):
    """A request field is invalid (checked client-side or by the server); `field` names it."""


class RequestTooLarge(TreadleClientError, ValueError):
    """The request message is over the server's size limit (`max_request_bytes`); not retried."""


class Overloaded(TreadleClientError):
    """The server's queue is full (RESOURCE_EXHAUSTED with RetryInfo); retry after `retry_after`."""

    retryable = True


class Unavailable(TreadleClientError):
    """No server could take the call, or it stopped: unreachable, starting, draining,
    or a request cut by server shutdown (UNAVAILABLE). Retrying may pass."""

    retryable = True


class DeadlineExceeded(TreadleClientError):
    """The call's timeout passed."""


class Cancelled(TreadleClientError):
    """The call was cancelled."""


class Unauthenticated(TreadleClientError):
    """The server wants a valid bearer token."""


class InternalError(TreadleClientError):
    """The server failed (INTERNAL, or anything unexpected)."""


_BY_CODE: dict[grpc.StatusCode, type[TreadleClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# gRPC core's own text for a message over the receiver's limit (it sends no details)
_TOO_LARGE_TEXT = "larger than max"


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a google.rpc.Status carried besides code and message."""

    field: str | None = None  # the first BadRequest field violation
    description: str | None = None  # that violation's description
    retry_after: float | None = None  # RetryInfo.retry_delay, seconds


def error_for(
    code: grpc.StatusCode, message: str, details: ErrorDetails | None = None
) -> TreadleClientError:
    """The typed exception for a status code, carrying the server's message and details.

    RESOURCE_EXHAUSTED is a full queue only when the server says when to
    retry (RetryInfo); without it, a message over the size limit (gRPC core's
    refusal) is RequestTooLarge. Servers that send no details at all still
    get Overloaded for anything else.
    """
    d = details or ErrorDetails()
    kind = _BY_CODE.get(code, InternalError)
    if (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED
        and d.retry_after is None
        and _TOO_LARGE_TEXT in message
    ):
        kind = RequestTooLarge
    return kind(message, code, field=d.field, retry_after=d.retry_after)


def error_from_rpc(exc: grpc.RpcError) -> TreadleClientError:
    """The typed exception of a failed call (sync or asyncio), with its structured details."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return error_for(code, message or code.name, details_from_metadata(trailing))


def error_from_number(number: int, message: str, field: str | None = None) -> TreadleClientError:
    """For the status code numbers carried inside a Finish (or a Session's `rejected`)."""
    code = _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
    return error_for(code, message, ErrorDetails(field=field or None))


def details_from_metadata(metadata: Iterable[Any] | None) -> ErrorDetails:
    """Parse `grpc-status-details-bin` from trailing metadata; empty details if absent or bad."""
    for key, value in _pairs(metadata):
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                return details_from_status(status_pb2.Status.FromString(value))
            except Exception:  # malformed details must not hide the error itself
                return ErrorDetails()
    return ErrorDetails()


def details_from_status(status: status_pb2.Status) -> ErrorDetails:
    field = description = retry_after = None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(bad) and bad.field_violations and field is None:
            field = bad.field_violations[0].field or None
            description = bad.field_violations[0].description or None
        elif detail.Unpack(retry) and retry.HasField("retry_delay"):
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return ErrorDetails(field, description, retry_after)


def _pairs(metadata: Iterable[Any] | None) -> Iterable[tuple[str, Any]]:
    """(key, value) pairs of sync (tuples) or asyncio (grpc.aio.Metadata) metadata."""
    if metadata is None:
        return ()
    return [(m[0], m[1]) for m in metadata]  # both iterate as (key, value), one per value
