"""The treadle.v1.Generation servicer: the gRPC face of the engine.

Protobuf stops here: requests are converted to `GenerationRequest` at the
door and events back to protobuf on the way out (`proto_convert.py`); status
codes come from `status_codes.py` alone. Engine request ids are always
assigned by the engine; the client's `request_id` is only echoed back, so
ids never collide across clients or sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

from .engine import Engine
from .errors import EngineUnavailableError, TreadleError, ValidationError
from .event_stream import EventStream
from .events import Event, FinishEvent, TokenEvent
from .generation_request import GenerationRequest
from .metrics import ServerMetrics
from .proto_convert import (
    chat_from_proto,
    chunk_to_proto,
    finish_to_proto,
    logprobs_to_proto,
    refused_finish,
    request_from_proto,
)
from .status_codes import code_number, finish_code, status_of

log = logging.getLogger("treadle.service")


class GenerationService(pb_grpc.GenerationServicer):
    """Serves one engine; until `engine` is set (the model is loading) calls get UNAVAILABLE."""

    def __init__(self, metrics: ServerMetrics, max_request_bytes: int) -> None:
        self.engine: Engine | None = None
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    # -- RPCs -------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        stream, client_id = await self._open(request, context)
        tokens: list[int] = []
        text: list[str] = []
        logprobs: list[pb.TokenLogprob] = []
        async with contextlib.aclosing(stream):  # an RPC ending early cancels
            async for event in stream:
                if isinstance(event, TokenEvent):
                    tokens.extend(event.token_ids)
                    text.append(event.text)
                    logprobs.extend(logprobs_to_proto(lp) for lp in event.logprobs)
                else:
                    return pb.GenerateResponse(
                        request_id=client_id,
                        token_ids=tokens,
                        text="".join(text),
                        logprobs=logprobs,
                        finish=await self._call_finish(event, context),
                    )
        raise AssertionError("a request stream ended without its finish event")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateEvent]:
        stream, client_id = await self._open(request, context)
        async with contextlib.aclosing(stream):  # an RPC ending early cancels
            async for event in stream:
                if isinstance(event, TokenEvent):
                    yield pb.GenerateEvent(request_id=client_id, token=chunk_to_proto(event))
                else:
                    finish = await self._call_finish(event, context)
                    yield pb.GenerateEvent(request_id=client_id, finish=finish)

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: Any
    ) -> AsyncIterator[pb.SessionEvent]:
        session = _Session(self, context)
        async for event in session.run(request_iterator):
            yield event

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: Any) -> pb.ModelInfoResponse:
        engine = await self._engine(context)
        limits = engine.config.limits
        return pb.ModelInfoResponse(
            model=engine.loaded.name,
            context_length=engine.loaded.context_length,
            max_total_tokens=engine.model_limits.max_total_len,
            vocab_size=engine.loaded.vocab_size,
            eos_token_ids=engine.loaded.eos_token_ids,
            max_batch_rows=engine.scheduler.config.max_rows,
            default_max_new_tokens=limits.default_max_new_tokens,
            max_stop_strings=limits.max_stop_strings,
            max_plugins=limits.max_plugins,
            max_top_logprobs=limits.max_top_logprobs,
            max_waiting=engine.config.max_waiting,
            max_request_bytes=self.max_request_bytes,
            plugins=engine.plugins.names(),
            has_chat_template=engine.inputs.has_chat_template,
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        engine = await self._engine(context)
        kind = request.WhichOneof("input")
        gen = GenerationRequest(
            prompt=request.prompt if kind == "prompt" else None,
            messages=chat_from_proto(request.chat) if kind == "chat" else None,
        )
        try:
            ids = engine.inputs.prompt_ids(gen)
        except TreadleError as exc:
            await self._abort(context, exc)
        tokens = engine.inputs.tokenizer.convert_ids_to_tokens(ids)
        return pb.TokenizeResponse(token_ids=ids, tokens=[str(t) for t in tokens])

    # -- helpers ------------------------------------------------------------------------
    async def _engine(self, context: Any) -> Engine:
        if self.engine is None:
            await self._abort(context, EngineUnavailableError("the model is still loading"))
        assert self.engine is not None
        return self.engine

    def submit(self, request: pb.GenerateRequest, context: Any) -> EventStream:
        """Convert and submit; raises TreadleError when the request is refused."""
        if self.engine is None:
            raise EngineUnavailableError("the model is still loading")
        remaining = context.time_remaining()  # the call's deadline, handed to the engine
        deadline = None if remaining is None else max(remaining, 1e-3)
        return self.engine.stream(request_from_proto(request, deadline=deadline))

    async def _open(self, request: pb.GenerateRequest, context: Any) -> tuple[EventStream, str]:
        try:
            stream = self.submit(request, context)
        except TreadleError as exc:
            await self._abort(context, exc)
        return stream, request.request_id or stream.request_id

    async def _abort(self, context: Any, exc: BaseException) -> NoReturn:
        code = status_of(exc)
        self.metrics.count_error(code.name)
        await context.abort(code, str(exc))
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def _call_finish(self, event: FinishEvent, context: Any) -> pb.Finish:
        """The Finish of a one-request call; a passed deadline fails the call instead.

        The engine holds the call's deadline too and may notice it a moment
        before gRPC does: either way the caller sees DEADLINE_EXCEEDED.
        """
        finish = self.finish_message(event)
        if finish_code(event) is grpc.StatusCode.DEADLINE_EXCEEDED:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, event.message or "")
        return finish

    def finish_message(self, event: FinishEvent) -> pb.Finish:
        """The wire Finish of a request; counts errors and cancellations by code."""
        code = finish_code(event)
        if code is not grpc.StatusCode.OK:
            self.metrics.count_error(code.name)
        return finish_to_proto(event, code_number(code))


class _Session:
    """One bidirectional Session: many requests on one stream, by client-chosen ids."""

    def __init__(self, service: GenerationService, context: Any) -> None:
        self.service = service
        self.context = context
        self.out: asyncio.Queue[pb.SessionEvent | None] = asyncio.Queue()
        self.open: dict[str, EventStream] = {}  # client id -> stream of a running request
        self.pumps: set[asyncio.Task[None]] = set()

    async def run(
        self, requests: AsyncIterator[pb.SessionRequest]
    ) -> AsyncIterator[pb.SessionEvent]:
        reader = asyncio.ensure_future(self._read(requests))
        try:
            while (event := await self.out.get()) is not None:
                yield event
            await reader  # re-raise what ended the reader, if anything
        finally:
            reader.cancel()
            for stream in self.open.values():
                stream.cancel()

    async def _read(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        try:
            async for msg in requests:
                action = msg.WhichOneof("action")
                if action == "generate":
                    self._start(msg.generate)
                elif action == "cancel" and msg.cancel.request_id in self.open:
                    self.open[msg.cancel.request_id].cancel()
        finally:  # half-closed or failed: the open requests still finish
            if self.pumps:
                await asyncio.gather(*self.pumps, return_exceptions=True)
            self.out.put_nowait(None)

    def _start(self, request: pb.GenerateRequest) -> None:
        client_id = request.request_id
        try:
            if not client_id:
                raise ValidationError("request_id", "is required in a Session")
            if client_id in self.open:
                raise ValidationError(
                    "request_id", f"{client_id!r} is already open in this Session"
                )
            stream = self.service.submit(request, self.context)
        except TreadleError as exc:
            code = status_of(exc)
            self.service.metrics.count_error(code.name)
            finish = refused_finish(code_number(code), str(exc))
            self.out.put_nowait(pb.SessionEvent(request_id=client_id, finish=finish))
            return
        self.open[client_id] = stream
        task = asyncio.ensure_future(self._pump(client_id, stream))
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)

    async def _pump(self, client_id: str, stream: EventStream) -> None:
        try:
            async for event in stream:
                self.out.put_nowait(self._event(client_id, event))
        finally:
            self.open.pop(client_id, None)

    def _event(self, client_id: str, event: Event) -> pb.SessionEvent:
        if isinstance(event, TokenEvent):
            return pb.SessionEvent(request_id=client_id, token=chunk_to_proto(event))
        return pb.SessionEvent(request_id=client_id, finish=self.service.finish_message(event))


def service_names() -> tuple[str, ...]:
    return (pb.DESCRIPTOR.services_by_name["Generation"].full_name,)
