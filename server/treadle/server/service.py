"""The treadle.v1.Generation servicer: the gRPC face of the engine.

Protobuf stops here: requests are converted to `GenerationRequest` at the
door and events back to protobuf on the way out (`proto_convert.py`); status
codes and error details come from `status_codes.py` alone. Engine request ids
are always assigned by the engine; the client's `request_id` is only echoed
back, so ids never collide across clients or sessions.

Hostile input costs the event loop nothing: converting a request, validating
it, rendering a chat template and tokenizing run on worker threads, each
after the size checks that bound it. A refused request gets its status with
`google.rpc` details; anything unexpected while refusing becomes INTERNAL with
a generic message and an error id (the details go to the server log only).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, NoReturn

import grpc

from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

from ..api.limits import RequestLimits
from ..scheduler.engine import Engine
from ..scheduler.errors import (
    DuplicateRequestError,
    EngineUnavailableError,
    SessionLimitError,
    TreadleError,
    ValidationError,
    log_internal_error,
)
from ..scheduler.event_stream import EventStream
from ..scheduler.events import Event, FinishEvent, TokenEvent
from ..scheduler.generation_request import GenerationRequest
from ..scheduler.validation import check_request_id
from .metrics import ServerMetrics
from .proto_convert import (
    chat_from_proto,
    chunk_to_proto,
    refused_finish,
    rejected,
    request_from_proto,
    tools_from_proto,
    wire_field,
)
from .samples import SampleFinishes, SampleResults
from .status_codes import code_number, finish_code, rich_status, status_of

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
        results = SampleResults(stream.samples)
        finishes = SampleFinishes(self.metrics, stream.samples)
        async with contextlib.aclosing(stream):  # an RPC ending early cancels
            async for event in stream:  # ends after the finish of every sample
                if isinstance(event, TokenEvent):
                    results.add(event)
                else:
                    results.finish(event.index, await self._call_finish(event, finishes, context))
        return results.response(client_id)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateEvent]:
        stream, client_id = await self._open(request, context)
        finishes = SampleFinishes(self.metrics, stream.samples)
        async with contextlib.aclosing(stream):  # an RPC ending early cancels
            async for event in stream:  # ends after the finish of every sample
                if isinstance(event, TokenEvent):
                    yield pb.GenerateEvent(request_id=client_id, token=chunk_to_proto(event))
                else:
                    finish = await self._call_finish(event, finishes, context)
                    yield pb.GenerateEvent(request_id=client_id, finish=finish)

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: Any
    ) -> AsyncIterator[pb.SessionEvent]:
        session = _Session(self, context)
        async for event in session.run(request_iterator):
            yield event

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: Any) -> pb.ModelInfoResponse:
        info = (await self._engine(context)).info
        return pb.ModelInfoResponse(
            model=info.model,
            context_length=info.context_length,
            max_total_tokens=info.max_total_tokens,
            vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids,
            max_batch_rows=info.max_batch_rows,
            kv_cache_tokens=info.kv_cache_tokens,
            max_waiting=info.max_waiting,
            max_request_bytes=self.max_request_bytes,
            plugins=info.plugins,
            has_chat_template=info.has_chat_template,
            max_prompt_chars=info.max_prompt_chars,  # derived when not set
            max_samples=min(info.limits.max_samples, info.max_batch_rows),  # run at once
            response_format_types=info.response_format_types,  # () without structured output
            accepts_images=info.accepts_images,
            **_reported_limits(info.limits),
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        engine = await self._engine(context)
        try:
            ids, tokens = await asyncio.to_thread(_tokenize, engine, request)
        except Exception as exc:
            await self._refuse(context, exc)
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

    # -- helpers ------------------------------------------------------------------------
    async def _engine(self, context: Any) -> Engine:
        if self.engine is None:
            await self._refuse(context, EngineUnavailableError("the model is still loading"))
        assert self.engine is not None
        if not self.engine.accepting:  # draining, or the engine failed
            await self._refuse(context, EngineUnavailableError("the server is shutting down"))
        return self.engine

    async def submit(self, request: pb.GenerateRequest, context: Any) -> EventStream:
        """The event stream of `request`, converted, validated and queued off the event loop
        under the call's deadline; raises TreadleError when it is refused (anything else
        is a bug, reported as INTERNAL by the caller)."""
        engine = self.engine
        if engine is None:
            raise EngineUnavailableError("the model is still loading")
        remaining = context.time_remaining()  # the call's deadline, handed to the engine
        deadline = None if remaining is None else max(remaining, 1e-3)
        limits = engine.info.limits
        gen = await asyncio.to_thread(request_from_proto, request, limits, deadline)
        stream = await engine.open_stream(gen, max_backlog=limits.max_stream_backlog)
        self.metrics.count_request("grpc")
        return stream

    async def _open(self, request: pb.GenerateRequest, context: Any) -> tuple[EventStream, str]:
        try:
            stream = await self.submit(request, context)
        except Exception as exc:
            await self._refuse(context, exc)
        return stream, request.request_id or stream.request_id

    async def _refuse(self, context: Any, exc: Exception) -> NoReturn:
        """End the call with the status of `exc` and its error details."""
        code, message, field = self.refusal(exc)
        await context.abort_with_status(rich_status(code, message, field))
        raise AssertionError("context.abort_with_status returned")  # pragma: no cover

    def refusal(self, exc: Exception) -> tuple[grpc.StatusCode, str, str | None]:
        """(code, message, field) of a refused request; counts it. An unexpected
        exception is logged with an error id and reported as INTERNAL with that id only."""
        field = None
        if isinstance(exc, TreadleError):
            code, message = status_of(exc), str(exc)
        else:
            code = grpc.StatusCode.INTERNAL
            message = log_internal_error(log, "refusing a request failed", exc_info=exc)
        if isinstance(exc, ValidationError):  # the engine's name of the field -> the wire's
            field = wire_field(exc.field)
            message = field + message.removeprefix(exc.field)
        self.metrics.count_error(code.name)
        return code, message, field

    async def _call_finish(
        self, event: FinishEvent, finishes: SampleFinishes, context: Any
    ) -> pb.Finish:
        """The Finish of a sample of a one-request call; a passed deadline or a reader too
        slow fails the call instead (DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED), at the first
        sample that ends so (the others end the same way: the whole request was ended).

        The engine holds the call's deadline too and may notice it a moment
        before gRPC does: either way the caller sees DEADLINE_EXCEEDED.
        """
        finish = finishes.message(event)
        code = finish_code(event)
        if code in _FAILS_THE_CALL:
            await context.abort_with_status(rich_status(code, event.message or ""))
        return finish


class _Session:
    """One bidirectional Session: many requests on one stream, by client-chosen ids.

    Items are handled in arrival order, one at a time (a `cancel` never overtakes
    the `generate` before it). Each accepted id ends with exactly one Finish per
    sample (one when n = 1) and stays open until the last of them; a `generate`
    whose id is still open gets a `Rejected` event instead. A bad or refused
    item fails alone: the session reads on.
    """

    def __init__(self, service: GenerationService, context: Any) -> None:
        self.service = service
        self.context = context
        self.out: asyncio.Queue[_Outgoing | None] = asyncio.Queue()  # events to send; None ends
        # client id -> stream of a running request, until the finish of its last sample
        self.open: dict[str, EventStream] = {}
        # Token events of a stream queued in `out`, until its last finish is sent. Keyed by
        # stream, not id: an id may be reused while its old request's events still wait.
        self.unread: dict[EventStream, int] = {}
        self.pumps: set[asyncio.Task[None]] = set()

    async def run(
        self, requests: AsyncIterator[pb.SessionRequest]
    ) -> AsyncIterator[pb.SessionEvent]:
        reader = asyncio.ensure_future(self._read(requests))
        try:
            while (item := await self.out.get()) is not None:
                if item.stream is not None:
                    self._dequeued(item.stream, item)
                yield item.event
            await reader  # re-raise what ended the reader, if anything
        finally:
            reader.cancel()
            for stream in self.open.values():
                stream.cancel()

    def _dequeued(self, stream: EventStream, item: _Outgoing) -> None:
        """Count `stream`'s event `item` as no longer queued."""
        if item.event.HasField("token"):
            self.unread[stream] -= 1
        elif item.last:
            del self.unread[stream]  # its last event: nothing of it is queued now

    async def _read(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        try:
            async for msg in requests:
                action = msg.WhichOneof("action")
                if action == "generate":
                    await self._start(msg.generate)
                elif action == "cancel" and msg.cancel.request_id in self.open:
                    self.open[msg.cancel.request_id].cancel()
        finally:  # half-closed or failed: the open requests still finish
            if self.pumps:
                await asyncio.gather(*self.pumps, return_exceptions=True)
            self.out.put_nowait(None)

    async def _start(self, request: pb.GenerateRequest) -> None:
        client_id = request.request_id
        try:
            limits = self.service.engine.info.limits if self.service.engine else None
            if not client_id:
                raise ValidationError("request_id", "is required in a Session")
            if limits is not None:
                check_request_id(client_id, limits)
            if client_id in self.open:
                raise DuplicateRequestError(
                    f"request_id: {client_id!r} is already open in this Session"
                )
            if limits is not None and len(self.open) >= limits.max_session_requests:
                raise SessionLimitError(
                    f"this Session has {len(self.open)} requests in flight, its limit; "
                    "send more once some have finished"
                )
            stream = await self.service.submit(request, self.context)
        except Exception as exc:
            self._refused(client_id, exc)
            return
        self.open[client_id] = stream
        self.unread[stream] = 0
        task = asyncio.ensure_future(self._pump(client_id, stream))
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)

    def _refused(self, client_id: str, exc: Exception) -> None:
        code, message, field = self.service.refusal(exc)
        if isinstance(exc, DuplicateRequestError):  # the open request with this id goes on
            event = pb.SessionEvent(
                request_id=client_id,
                rejected=rejected(code_number(code), message, "request_id"),
            )
        else:
            if field == "request_id":  # an id refused for itself is not echoed
                client_id = ""
            finish = refused_finish(code_number(code), message, field or "")
            event = pb.SessionEvent(request_id=client_id, finish=finish)
        self.out.put_nowait(_Outgoing(None, event))

    async def _pump(self, client_id: str, stream: EventStream) -> None:
        """Queue `stream`'s events for the client; the id is open until its last finish."""
        limit = stream.max_backlog
        finishes = SampleFinishes(self.service.metrics, stream.samples)
        try:
            async for event in stream:  # ends after the finish of every sample
                if isinstance(event, TokenEvent):
                    if self.unread[stream] >= limit:  # the client is not reading: dropped
                        stream.cut()
                        continue
                    self.unread[stream] += 1
                event_out = self._event(client_id, event, finishes)
                self.out.put_nowait(_Outgoing(stream, event_out, finishes.ended))
        finally:
            self.open.pop(client_id, None)

    @staticmethod
    def _event(client_id: str, event: Event, finishes: SampleFinishes) -> pb.SessionEvent:
        if isinstance(event, TokenEvent):
            return pb.SessionEvent(request_id=client_id, token=chunk_to_proto(event))
        return pb.SessionEvent(request_id=client_id, finish=finishes.message(event))


class _Outgoing(NamedTuple):
    """An event a Session is to send."""

    stream: EventStream | None  # the stream it came from; None: a refusal
    event: pb.SessionEvent
    last: bool = False  # the stream's last event (the finish of its last sample)


# The RequestLimits fields ModelInfoResponse reports under the same name (the others are
# filled in by hand: max_prompt_chars may be unset and is derived; max_samples is capped
# by the batch, since a request's samples run at once).
_DERIVED_LIMITS = frozenset({"max_prompt_chars", "max_samples"})
_MODEL_INFO_LIMITS = tuple(
    f.name
    for f in dataclasses.fields(RequestLimits)
    if f.name in pb.ModelInfoResponse.DESCRIPTOR.fields_by_name and f.name not in _DERIVED_LIMITS
)


def _reported_limits(limits: RequestLimits) -> dict[str, Any]:
    """The limits ModelInfoResponse reports by name (ints, and the compile time in seconds)."""
    return {name: getattr(limits, name) for name in _MODEL_INFO_LIMITS}


def _tokenize(engine: Engine, request: pb.TokenizeRequest) -> tuple[list[int], list[str]]:
    """The token ids of a Tokenize input and their token strings (runs off the event loop)."""
    kind = request.WhichOneof("input")
    limits = engine.info.limits
    tools, tool_choice = tools_from_proto(request.chat, limits) if kind == "chat" else ([], None)
    gen = GenerationRequest(
        prompt=request.prompt if kind == "prompt" else None,
        messages=chat_from_proto(request.chat, limits) if kind == "chat" else None,
        tools=tools,
        tool_choice=tool_choice,
    )
    return engine.tokenize(gen)


# Outcomes that end a one-request call with their status instead of a Finish.
_FAILS_THE_CALL = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED})


def service_names() -> tuple[str, ...]:
    return (pb.DESCRIPTOR.services_by_name["Generation"].full_name,)
