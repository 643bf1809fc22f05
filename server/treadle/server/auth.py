"""Bearer-token authentication: the token check both frontends share, and the gRPC interceptor
that applies it to every RPC but health checks and reflection (the HTTP frontend applies it
to every route but its probes, in http/app.py)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerToken:
    """The one token every call must carry as `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def accepts(self, authorization: str | bytes | None) -> bool:
        """Whether an `authorization` header (metadata) value carries the token; compared
        in constant time. None (no header) is refused."""
        if authorization is None:
            return False
        given = authorization.encode() if isinstance(authorization, str) else bytes(authorization)
        return hmac.compare_digest(given, self._expected)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._token = BearerToken(token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _refusing(handler)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key == "authorization":
                return self._token.accepts(value)
        return False


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        _refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
