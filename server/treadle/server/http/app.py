"""The OpenAI-compatible routes, on the engine the gRPC service serves.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    GET /health (live: the process answers)   GET /ready (SERVING: loaded, not draining)

The same house rules as gRPC: the bearer token (every route but the probes), the limits
(the engine's, plus `--max-request-bytes` on the body), the metrics (frontend "http") and
the drain (once the engine stops accepting, new requests get 503 and /ready turns 503;
answers in progress go on). A request is read, parsed, validated and tokenized off the
event loop, then queued; refusals go through errors.py alone. A client that disconnects
cancels its request: the engine frees its rows on the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ...scheduler.engine import Engine
from ...scheduler.errors import EngineUnavailableError
from ..auth import BearerToken
from ..metrics import ServerMetrics
from .convert import chat_call, completion_call
from .errors import (
    CHAT_PARAMS,
    COMPLETION_PARAMS,
    ApiError,
    api_error,
    body_too_large,
    unauthenticated,
    unknown_model,
)
from .open_requests import OpenRequests
from .pieces import TokenPieces
from .requests import EngineCall
from .results import WholeAnswer
from .streaming import StreamShape, sse

log = logging.getLogger("treadle.http")

FRONTEND = "http"  # the metrics' `frontend` label


class HttpFrontend:
    """Serves one engine over HTTP; until `attach` (the model is loading) calls get 503."""

    def __init__(
        self, metrics: ServerMetrics, max_request_bytes: int, auth_token: str | None
    ) -> None:
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self._token = BearerToken(auth_token) if auth_token else None
        self._engine: Engine | None = None
        self._pieces = TokenPieces([])
        self._created = int(time.time())
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        self.requests = OpenRequests(Starlette(routes=routes))
        self.app = self.requests  # the ASGI app to serve

    async def attach(self, engine: Engine) -> None:
        """Serve `engine` (started and warmed up); builds the token table off the event loop."""
        self._pieces = await asyncio.to_thread(TokenPieces.of_engine, engine)
        self._engine = engine

    # -- probes -------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """200 SERVING once the model is loaded and warmed up; 503 before, and while
        draining or after the engine failed (the same moments gRPC health says so)."""
        serving = self._engine is not None and self._engine.accepting
        status = "SERVING" if serving else "NOT_SERVING"
        return JSONResponse({"status": status}, status_code=200 if serving else 503)

    # -- API ----------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            info = self._serving().info
        except Exception as exc:
            return self._refused(exc, CHAT_PARAMS)
        model = {
            "id": info.model,
            "object": "model",
            "created": self._created,
            "owned_by": "treadle",
            "max_model_len": info.max_total_tokens,
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            engine = self._serving()
            limits = engine.info.limits
            raw = await self._body(request)
            chat = await asyncio.to_thread(chat_call, raw, limits, self.max_request_bytes)
            self._check_model(chat.body.model, engine)
            call = await EngineCall.open(engine, [chat.gen], limits.max_stream_backlog)
        except Exception as exc:
            return self._refused(exc, CHAT_PARAMS)
        shape = StreamShape(
            chat=True,
            model=chat.body.model,
            choices=chat.body.n,
            samples=chat.body.n,
            logprobs=chat.body.logprobs,
            include_usage=bool(chat.body.stream_options and chat.body.stream_options.include_usage),
        )
        return await self._answer(request, call, shape, stream=chat.body.stream)

    async def completions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            engine = self._serving()
            limits = engine.info.limits
            raw = await self._body(request)
            done = await asyncio.to_thread(completion_call, raw, limits, self.max_request_bytes)
            self._check_model(done.body.model, engine)
            call = await EngineCall.open(engine, done.gens, limits.max_stream_backlog)
        except Exception as exc:
            return self._refused(exc, COMPLETION_PARAMS)
        body = done.body
        shape = StreamShape(
            chat=False,
            model=body.model,
            choices=len(done.gens) * body.n,
            samples=body.n,
            logprobs=body.logprobs is not None,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
        return await self._answer(request, call, shape, stream=body.stream)

    # -- helpers ------------------------------------------------------------------------
    async def _answer(
        self, request: Request, call: EngineCall, shape: StreamShape, stream: bool
    ) -> Response:
        """The queued `call`'s answer: a stream of events, or the whole answer at once."""
        self.metrics.count_request(FRONTEND)
        if stream:
            events = sse(call, shape, self._pieces, self._count)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        answer = WholeAnswer(shape.choices, shape.samples, shape.logprobs, self._pieces)
        try:
            if not await _unless_disconnected(request, _gather(call, answer)):
                return Response(status_code=499)  # nobody is left to read it
        except Exception as exc:
            return self._refused(exc, CHAT_PARAMS)
        finally:
            await call.aclose()
        whole = answer.chat(shape.model) if shape.chat else answer.completion(shape.model)
        return JSONResponse(whole)

    def _authorize(self, request: Request) -> None:
        given = request.headers.get("authorization")
        if self._token is not None and not self._token.accepts(given):
            raise unauthenticated()

    def _serving(self) -> Engine:
        """The engine, if it takes requests (EngineUnavailableError otherwise: 503)."""
        if self._engine is None:
            raise EngineUnavailableError("the model is still loading")
        if not self._engine.accepting:  # draining, or the engine failed
            raise EngineUnavailableError("the server is shutting down")
        return self._engine

    @staticmethod
    def _check_model(name: str, engine: Engine) -> None:
        served = engine.info.model
        if name != served:
            raise unknown_model(name, served)

    async def _body(self, request: Request) -> bytes:
        """The request body, read up to `max_request_bytes` (ApiError beyond)."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise body_too_large(limit)
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise body_too_large(limit)
            parts.append(part)
        return b"".join(parts)

    def _refused(self, exc: Exception, params: Mapping[str, str]) -> Response:
        error = api_error(exc, params)
        self._count(error)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def _count(self, error: ApiError) -> None:
        self.metrics.count_error(error.code.name, FRONTEND)


async def _gather(call: EngineCall, answer: WholeAnswer) -> None:
    async for prompt, event in call.events():
        answer.add(prompt, event)


async def _unless_disconnected(request: Request, work: Awaitable[None]) -> bool:
    """Run `work` to its end (True; its exception is raised), unless the client
    disconnects first: then `work` is cancelled (False)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return False
    task.result()
    return True


async def _disconnect(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    """Return once the client has disconnected (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
