"""Typed exceptions of the SDK, mapped from gRPC status codes in one place."""

from __future__ import annotations

import grpc


class TreadleClientError(Exception):
    """Base of every SDK error; `code` is the gRPC status (None for client-side checks)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidArgument(TreadleClientError, ValueError):
    """A request field is invalid (checked client-side or by the server); `field` names it."""

    @property
    def field(self) -> str:
        return self.message.partition(":")[0]


class Overloaded(TreadleClientError):
    """The server's queue is full (RESOURCE_EXHAUSTED); retry later."""


class Unavailable(TreadleClientError):
    """No server could take the call: unreachable, starting or draining (UNAVAILABLE)."""


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


def error_for(code: grpc.StatusCode, message: str) -> TreadleClientError:
    """The typed exception for a status code, carrying the server's message."""
    return _BY_CODE.get(code, InternalError)(message, code)


def error_from_rpc(exc: grpc.RpcError) -> TreadleClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for(code, details or code.name)


def error_from_number(number: int, message: str) -> TreadleClientError:
    """For the status code numbers carried inside a Finish."""
    return error_for(_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN), message)
