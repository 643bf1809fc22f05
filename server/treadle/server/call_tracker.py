"""Which calls are still open: a server interceptor the drain uses to let answers reach clients."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .open_set import OpenSet


class CallTracker(grpc.aio.ServerInterceptor):
    """Counts every call from its handler's start until gRPC reports it terminated."""

    def __init__(self) -> None:
        self.calls = OpenSet()  # the ServicerContext of each open call
        self.snapshot = self.calls.snapshot
        self.wait_closed = self.calls.wait_closed

    def _track(self, context: Any) -> None:
        self.calls.add(context)
        context.add_done_callback(lambda _: self.calls.discard(context))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return handler if handler is None else _tracked(handler, self._track)


def _tracked(handler: grpc.RpcMethodHandler, track: Callable[[Any], None]) -> Any:
    """`handler` with `track(context)` called when its behaviour starts."""
    kind = (handler.request_streaming, handler.response_streaming)
    make, attr = {
        (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
        (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
        (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
        (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
    }[kind]
    behavior = getattr(handler, attr)

    async def unary(request: Any, context: Any) -> Any:
        track(context)
        return await behavior(request, context)

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        track(context)
        async for response in behavior(request, context):
            yield response

    # A streaming behaviour is an async generator, or a coroutine that calls context.write.
    return make(
        streaming if inspect.isasyncgenfunction(behavior) else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
