"""Engine events -> OpenAI's choices: finish reasons, logprobs, tool calls, usage, and the
whole (not streamed) responses.

A choice is one sample of one prompt: choice `prompt * n + sample`. finish_reason maps
through one table (stop / length / tool_calls; content_filter never); a sample that was
cancelled or failed makes the whole answer an error (`ApiError`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from ...api.outcome import FinishReason, TokenLogprob
from ...api.tools import ToolCall
from ...scheduler.events import FinishEvent, TokenEvent
from ..status_codes import finish_code
from .errors import ApiError
from .pieces import TokenPieces

SYSTEM_FINGERPRINT = "fp_treadle_0.1.0"

_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.TIME_LIMIT: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.STOP_TOKEN: "stop",
    FinishReason.STOP_CRITERION: "stop",
}


def finish_reason(event: FinishEvent) -> str:
    """OpenAI's finish_reason of a sample; ApiError when it was cancelled or failed."""
    if event.tool_calls:
        return "tool_calls"
    reason = _FINISH_REASONS.get(event.reason)
    if reason is None:
        code = finish_code(event)
        if code is grpc.StatusCode.OK:  # a reason this table misses: a bug, said plainly
            code = grpc.StatusCode.INTERNAL
        raise ApiError(code, event.message or f"the request ended: {event.reason.value}")
    return reason


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def tool_calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def chat_logprobs(lps: Sequence[TokenLogprob], pieces: TokenPieces) -> list[dict[str, Any]]:
    """`logprobs.content` entries of a chat choice: token text, logprob, bytes, top."""
    return [
        {
            **_token(lp.token_id, lp.logprob, pieces),
            "top_logprobs": [_token(t, v, pieces) for t, v in lp.top],
        }
        for lp in lps
    ]


def _token(token_id: int, logprob: float, pieces: TokenPieces) -> dict[str, Any]:
    raw = pieces.bytes_of(token_id)
    return {
        "token": raw.decode("utf-8", errors="replace"),
        "logprob": logprob,
        "bytes": list(raw),
    }


@dataclass
class CompletionLogprobs:
    """The legacy `logprobs` object of a completion choice, built up token by token."""

    offset: int = 0  # characters of the choice's text before the next token
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, lps: Sequence[TokenLogprob], pieces: TokenPieces) -> None:
        for lp in lps:
            text = pieces.text(lp.token_id)
            self.tokens.append(text)
            self.token_logprobs.append(lp.logprob)
            self.top_logprobs.append({pieces.text(t): v for t, v in lp.top})
            self.text_offset.append(self.offset)
            self.offset += len(text)

    def json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }

    def take(self) -> dict[str, Any]:
        """The entries added since the last `take` (a stream sends each token once)."""
        taken = self.json()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return taken


@dataclass
class UsageTotals:
    """Token counts of an answer: each prompt once, every sample's generated tokens."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, event: FinishEvent) -> None:
        if event.index == 0:  # every sample of a prompt reports the same prompt
            self.prompt_tokens += event.usage.prompt_tokens
            self.cached_tokens += event.usage.cached_prompt_tokens
        self.completion_tokens += event.usage.generated_tokens

    def json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    chat_logprobs: list[dict[str, Any]] = field(default_factory=list)
    completion_logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


class WholeAnswer:
    """The choices of a request answered at once, gathered from its interleaved events."""

    def __init__(self, choices: int, samples: int, logprobs: bool, pieces: TokenPieces) -> None:
        self._choices = [_Choice() for _ in range(choices)]
        self._samples = samples  # n: choices per prompt
        self._logprobs = logprobs
        self._pieces = pieces
        self.usage = UsageTotals()

    def add(self, prompt: int, event: TokenEvent | FinishEvent) -> None:
        """Add an event of prompt `prompt`'s engine request (raises ApiError on a failure)."""
        choice = self._choices[prompt * self._samples + event.index]
        if isinstance(event, FinishEvent):
            choice.finish_reason = finish_reason(event)
            choice.tool_calls = event.tool_calls
            self.usage.add(event)
            return
        choice.text.append(event.text)
        if self._logprobs:
            choice.chat_logprobs.extend(chat_logprobs(event.logprobs, self._pieces))
            choice.completion_logprobs.add(event.logprobs, self._pieces)

    def chat(self, model: str) -> dict[str, Any]:
        """The chat.completion object."""
        return self._response("chatcmpl", "chat.completion", model, self._chat_choice)

    def completion(self, model: str) -> dict[str, Any]:
        """The text_completion object."""
        return self._response("cmpl", "text_completion", model, self._completion_choice)

    def _response(self, prefix: str, kind: str, model: str, render: Any) -> dict[str, Any]:
        return {
            "id": new_id(prefix),
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [render(i, c) for i, c in enumerate(self._choices)],
            "usage": self.usage.json(),
        }

    def _chat_choice(self, index: int, c: _Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(c.text)}
        if c.tool_calls:
            message["content"] = message["content"] or None
            message["tool_calls"] = tool_calls_json(c.tool_calls)
        return {
            "index": index,
            "message": message,
            "logprobs": {"content": c.chat_logprobs} if self._logprobs else None,
            "finish_reason": c.finish_reason,
        }

    def _completion_choice(self, index: int, c: _Choice) -> dict[str, Any]:
        return {
            "index": index,
            "text": "".join(c.text),
            "logprobs": c.completion_logprobs.json() if self._logprobs else None,
            "finish_reason": c.finish_reason,
        }
