"""Engine events -> server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

    data: {"id": ..., "object": "chat.completion.chunk", "choices": [{"index": 0,
           "delta": {"content": "Hel"}, "logprobs": null, "finish_reason": null}], ...}

A chat stream opens each choice with a chunk carrying `role` (and empty content), then
sends a chunk per engine step that released text (or logprobs), then the choice's tool
calls if it made any, then a chunk with its finish_reason. With
`stream_options.include_usage` every chunk has `"usage": null` and a last chunk with no
choices carries the usage. A sample that was cancelled or failed ends the stream with an
`{"error": ...}` event (the OpenAI client raises it) and `[DONE]`.

The fields that never change are serialized once per stream (`_Frame`), so a chunk costs
one small `json.dumps` of its choices.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ...scheduler.events import FinishEvent, TokenEvent
from .errors import ApiError
from .pieces import TokenPieces
from .requests import EngineCall
from .results import (
    SYSTEM_FINGERPRINT,
    CompletionLogprobs,
    UsageTotals,
    chat_logprobs,
    finish_reason,
    new_id,
    tool_calls_json,
)

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class StreamShape:
    """What one streamed answer looks like."""

    chat: bool  # chat.completion.chunk (else text_completion)
    model: str
    choices: int  # prompts x n
    samples: int  # n
    logprobs: bool
    include_usage: bool


class _Frame:
    """The unchanging part of every chunk of one stream, serialized once."""

    def __init__(self, shape: StreamShape) -> None:
        kind, prefix = (
            ("chat.completion.chunk", "chatcmpl") if shape.chat else ("text_completion", "cmpl")
        )
        head = {
            "id": new_id(prefix),
            "object": kind,
            "created": int(time.time()),
            "model": shape.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        self._head = b"data: " + _json(head)[:-1] + b',"choices":'
        self._tail = b',"usage":null}\n\n' if shape.include_usage else b"}\n\n"

    def chunk(self, choices: list[dict[str, Any]]) -> bytes:
        return self._head + _json(choices) + self._tail

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        return self._head + b'[],"usage":' + _json(usage) + b"}\n\n"


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def sse(
    call: EngineCall,
    shape: StreamShape,
    pieces: TokenPieces,
    on_error: Callable[[ApiError], None],
) -> AsyncIterator[bytes]:
    """The server-sent events of `call`; closing the iterator cancels the engine requests."""
    frame = _Frame(shape)
    usage = UsageTotals()
    choices = _StreamChoices(shape, pieces)
    try:
        if shape.chat:
            yield frame.chunk([choices.opening(i) for i in range(shape.choices)])
        async for prompt, event in call.events():
            index = prompt * shape.samples + event.index
            if isinstance(event, TokenEvent):
                if event.text or (shape.logprobs and event.logprobs):
                    yield frame.chunk([choices.tokens(index, event)])
                continue
            try:
                reason = finish_reason(event)
            except ApiError as error:
                on_error(error)
                yield b"data: " + _json(error.body()) + b"\n\n"
                break
            usage.add(event)
            if shape.chat and event.tool_calls:
                yield frame.chunk([choices.tool_calls(index, event)])
            yield frame.chunk([choices.finish(index, reason)])
        else:
            if shape.include_usage:
                yield frame.usage_chunk(usage.json())
        yield DONE
    finally:
        await call.aclose()


class _StreamChoices:
    """The `choices` entries of one stream's chunks."""

    def __init__(self, shape: StreamShape, pieces: TokenPieces) -> None:
        self._shape = shape
        self._pieces = pieces
        # completions: each choice's legacy logprobs (their text offsets run on)
        self._offsets = [CompletionLogprobs() for _ in range(shape.choices)]

    def opening(self, index: int) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def tokens(self, index: int, event: TokenEvent) -> dict[str, Any]:
        logprobs = None
        if self._shape.chat:
            if self._shape.logprobs:
                logprobs = {"content": chat_logprobs(event.logprobs, self._pieces)}
            delta = {"content": event.text}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        if self._shape.logprobs:
            self._offsets[index].add(event.logprobs, self._pieces)
            logprobs = self._offsets[index].take()
        return {"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": None}

    def tool_calls(self, index: int, event: FinishEvent) -> dict[str, Any]:
        calls = [{"index": k, **c} for k, c in enumerate(tool_calls_json(event.tool_calls))]
        delta = {"tool_calls": calls}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        if self._shape.chat:
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}
