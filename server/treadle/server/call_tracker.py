"""Which calls are still open: a server interceptor the drain uses to let answers reach clients."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class CallTracker(grpc.aio.ServerInterceptor):
    """Counts every call from its handler's start until gRPC reports it terminated."""

    def __init__(self) -> None:
        self._open: set[Any] = set()  # the ServicerContext of each open call
        self._changed = asyncio.Event()

    def snapshot(self) -> set[Any]:
        """The calls open now."""
        return set(self._open)

    async def wait_closed(self, calls: set[Any], timeout: float) -> bool:
        """Wait (at most `timeout` s) until every call in `calls` has terminated."""
        try:
            async with asyncio.timeout(timeout):
                while calls & self._open:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    def _track(self, context: Any) -> None:
        self._open.add(context)
        context.add_done_callback(lambda _: self._closed(context))

    def _closed(self, context: Any) -> None:
        self._open.discard(context)
        self._changed.set()

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
