"""The asyncio SDK: `AsyncClient`."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

from ..api.checks import ParameterError, check_params
from ..api.limits import RequestLimits
from ..api.params import ChatMessage, GenerationParams
from .connection import Connection, TlsConfig
from .convert import (
    Message,
    Prompt,
    chat_messages,
    chat_to_proto,
    model_info_from_proto,
    request_to_proto,
    result_from_proto,
)
from .errors import InvalidArgument, error_from_rpc
from .formats import check_format_accepted
from .images import check_images
from .results import ModelInfo, Result
from .retry import RetryPolicy
from .session import AsyncSession
from .streams import ResponseStream, raise_if_failed
from .tools import ToolChoiceLike, ToolLike, chat_tools

_Response = TypeVar("_Response")


class AsyncClient:
    """A treadle client for asyncio programs, over one reused channel.

        async with AsyncClient("localhost:50051") as client:
            result = await client.generate("Once upon a time", max_new_tokens=32)
            async for text in client.stream_text([{"role": "user", "content": "Hi"}]):
                print(text, end="")

    Inputs: a string (raw prompt), a list of chat messages (rendered with the
    model's chat template on the server), or `token_ids=`. Parameters: a
    `GenerationParams` and/or its fields as keyword arguments (`n=3` asks for
    three samples of the prompt: `Result.samples`, events tagged with their
    sample's `index`; `response_format=json_schema(...)` constrains the output,
    see `treadle.client.formats`). A chat may offer `tools=` (Tool, `tool()`, or
    OpenAI-style dicts) with a `tool_choice=` ("none", "auto", "required" or a
    tool's name); the calls come back in `Result.tool_calls` / `Finish.tool_calls`
    (see `treadle.client.tools`). A message's content may be a list of text and
    image parts (`image()`, see `treadle.client.images`), for a model that
    accepts images. Parameters are checked before anything is sent
    (InvalidArgument with the server's own messages; after `model_info()`, also
    against the server's limits, the response formats it accepts and whether its
    model accepts images).
    Errors are typed (see `treadle.client.errors`). `timeout` (seconds) applies per call, retries
    included. gRPC retries refused calls (UNAVAILABLE) per `retry`, within a
    retry budget shared by the client's calls, and only until the first
    response arrives, never after.
    """

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        tls: TlsConfig | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        self.connection = Connection(
            target=target,
            tls=tls,
            token=token,
            metadata=tuple(metadata),
            retry=retry or RetryPolicy(),
        )
        self.timeout = timeout
        self.limits = limits  # per-request limits to check client-side (model_info() sets them)
        # the response_format types the server accepts; None: unknown (model_info() sets it)
        self.response_format_types: tuple[str, ...] | None = None
        # whether the served model accepts images; None: unknown (model_info() sets it)
        self.accepts_images: bool | None = None
        self._channel: grpc.aio.Channel | None = None
        self._probe: grpc.aio.Channel | None = None  # health checks: a plain channel

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channel, self._probe = (self._channel, self._probe), None, None
        for channel in channels:
            if channel is not None:
                await channel.close()

    @property
    def retry(self) -> RetryPolicy:
        return self.connection.retry

    @property
    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self._get_channel())

    # -- calls ------------------------------------------------------------------------
    async def generate(
        self,
        prompt: Prompt | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        params: GenerationParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **overrides: Any,
    ) -> Result:
        """Generate a whole answer (`n` answers with `n=`: `Result.samples`).

        Raises a TreadleClientError if the request fails (any of its samples),
        and Unavailable (retryable) if server shutdown cut it: partial text is
        never returned as a result.
        """
        request = self.build_request(prompt, token_ids, params, request_id, overrides)
        result = result_from_proto(await self._unary(self.stub.Generate, request, timeout))
        raise_if_failed(result)
        return result

    def stream(
        self,
        prompt: Prompt | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        params: GenerationParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **overrides: Any,
    ) -> ResponseStream:
        """Stream a request's events (TokenChunk..., Finish; with `n=`, each sample's,
        interleaved); see ResponseStream. A sample's tool calls are in its Finish."""
        request = self.build_request(prompt, token_ids, params, request_id, overrides)
        stub = self.stub
        return ResponseStream(
            lambda: stub.GenerateStream(
                request, timeout=self._timeout(timeout), metadata=self._metadata()
            ),
            samples=request.n or 1,
        )

    def stream_text(self, prompt: Prompt | None = None, **kwargs: Any) -> Any:
        """Only the text of `stream(...)`, as it is released (an async iterator of str)."""
        return self.stream(prompt, **kwargs).text()

    def session(self, timeout: float | None = None) -> AsyncSession:
        """A multiplexed bidirectional session (`async with client.session() as s`)."""
        return AsyncSession(self.stub, self.build_request, self._metadata(), self._timeout(timeout))

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        """The served model and its limits; later requests are checked against those limits."""
        response = await self._unary(self.stub.ModelInfo, pb.ModelInfoRequest(), timeout)
        info = model_info_from_proto(response)
        self.limits = dataclasses.replace(
            self.limits or RequestLimits(),
            default_max_new_tokens=info.default_max_new_tokens,
            max_stop_strings=info.max_stop_strings,
            max_plugins=info.max_plugins,
            max_top_logprobs=info.max_top_logprobs,
            max_samples=info.max_samples,
            max_response_format_bytes=info.max_response_format_bytes,
            max_response_format_choices=info.max_response_format_choices,
            response_format_compile_seconds=info.response_format_compile_seconds,
            max_tools=info.max_tools,
            max_tools_bytes=info.max_tools_bytes,
            max_images=info.max_images,
            max_image_bytes=info.max_image_bytes,
            max_image_pixels=info.max_image_pixels,
            max_stop_token_sequences=info.max_stop_token_sequences,
            max_stop_token_sequence_len=info.max_stop_token_sequence_len,
        )
        self.response_format_types = info.response_format_types
        self.accepts_images = info.accepts_images
        return info

    async def tokenize(
        self,
        prompt: Prompt,
        timeout: float | None = None,
        tools: Sequence[ToolLike] = (),
        tool_choice: ToolChoiceLike | None = None,
    ) -> list[int]:
        """The token ids the server would generate from for `prompt` (a chat rendered with
        `tools`, as `generate` would)."""
        if isinstance(prompt, str):
            if tools:
                raise InvalidArgument("chat.tools: is for a chat input only", field="chat.tools")
            request = pb.TokenizeRequest(prompt=prompt)
        else:
            try:
                messages = self.chat_messages(prompt)
                tool_list, choice = chat_tools(tools, tool_choice, self.limits)
                request = pb.TokenizeRequest(chat=chat_to_proto(messages, tool_list, choice))
            except ParameterError as exc:
                raise InvalidArgument(str(exc), field=exc.field) from None
        response = await self._unary(self.stub.Tokenize, request, timeout)
        return list(response.token_ids)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status: "SERVING", "NOT_SERVING", ...

        Asked over a plain channel of its own (no client-side health checking,
        no retries), so a loading or draining server answers NOT_SERVING
        instead of looking unreachable. With several targets, one answers.
        """
        if self._probe is None:
            self._probe = self.connection.aio_channel(probe=True)
        stub = health_pb2_grpc.HealthStub(self._probe)
        response = await self._unary(
            stub.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    # -- helpers ----------------------------------------------------------------------
    async def _unary(
        self, method: Callable[..., Awaitable[_Response]], request: Any, timeout: float | None
    ) -> _Response:
        """One unary call with this client's timeout and metadata; failures become typed errors."""
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self._metadata())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def build_request(
        self,
        prompt: Prompt | None,
        token_ids: Sequence[int] | None,
        params: GenerationParams | None,
        request_id: str,
        overrides: dict[str, Any],
    ) -> pb.GenerateRequest:
        """The checked wire request; raises InvalidArgument before anything is sent (a
        malformed message, image, tool or tool choice, tools for an input that is not a chat).

        `overrides` are GenerationParams fields, and the chat's `tools` and `tool_choice`.
        """
        overrides = dict(overrides)
        tools: Sequence[ToolLike] = overrides.pop("tools", ())
        tool_choice: ToolChoiceLike | None = overrides.pop("tool_choice", None)
        try:
            p = dataclasses.replace(params or GenerationParams(), **overrides)
        except TypeError as exc:
            raise TypeError(f"unknown generation parameter: {exc}") from None
        if (prompt is None) == (token_ids is None):
            raise InvalidArgument(
                "input: exactly one of prompt (text or messages) or token_ids", field="input"
            )
        if isinstance(prompt, str) and not prompt:
            raise InvalidArgument("prompt: must not be empty", field="prompt")
        if prompt is not None and not isinstance(prompt, str) and not prompt:
            raise InvalidArgument("chat: must not be empty", field="chat")
        try:
            check_params(p, self.limits)
            check_format_accepted(p.response_format, self.response_format_types)
            if prompt is not None and not isinstance(prompt, str):
                prompt = self.chat_messages(prompt)
            chat_tool_list, choice = chat_tools(tools, tool_choice, self.limits)
            return request_to_proto(
                prompt, token_ids, p, request_id, tools=chat_tool_list, tool_choice=choice
            )
        except ParameterError as exc:
            raise InvalidArgument(str(exc), field=exc.field) from None

    def chat_messages(self, messages: Sequence[Message]) -> list[ChatMessage]:
        """A chat's messages as ChatMessages, their images checked (check_images); raises
        ParameterError naming the wire field."""
        converted = chat_messages(messages)
        check_images(converted, self.limits, self.accepts_images)
        return converted

    def _get_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self.connection.aio_channel()
        return self._channel

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self.connection.call_metadata()

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout
