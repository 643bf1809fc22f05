"""Turning a request's input (prompt, chat messages or token ids) into prompt token ids."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

from .errors import ValidationError
from .generation_request import GenerationRequest
from .tool_format import ToolSpec, generic_messages, template_messages


class InputProcessor:
    """Tokenizes request inputs on the caller's thread.

    Holds its own copy of the tokenizer, so encoding never shares a Rust
    tokenizer with the step thread's detokenizers, and a lock for callers
    on several threads.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders tools and calls itself (else treadle writes
        them in its generic format: tool_format.py)."""
        return "tools" in str(getattr(self.tokenizer, "chat_template", None) or "")

    def prompt_ids(self, req: GenerationRequest, tools: Sequence[ToolSpec] = ()) -> list[int]:
        """The prompt's token ids, a chat rendered with `tools` (the request's, parsed);
        raises ValidationError naming the input's wire field (`prompt`, `chat`,
        `token_ids`: `prompt`, `messages`, `prompt_token_ids` here)."""
        given = input_fields(req)
        if len(given) != 1:
            raise ValidationError(
                "input",
                "exactly one of prompt, chat, token_ids must be set"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if req.prompt_token_ids is not None:
            return self._checked_ids(req.prompt_token_ids)
        if req.messages is not None:
            return self._render_chat(req, tools)
        assert req.prompt is not None
        if not req.prompt:
            raise ValidationError("prompt", "must not be empty")
        return self.encode(req.prompt, add_special_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _render_chat(self, req: GenerationRequest, tools: Sequence[ToolSpec]) -> list[int]:
        assert req.messages is not None
        if not req.messages:
            raise ValidationError("chat", "must not be empty")
        for i, m in enumerate(req.messages):
            if not m.role:
                raise ValidationError(f"chat.messages[{i}].role", "must not be empty")
        if not self.has_chat_template:
            raise ValidationError("chat", "the model has no chat template; send a prompt")
        extra: dict[str, Any] = {}
        if self.template_takes_tools:
            messages = template_messages(req.messages)
            if tools:
                extra["tools"] = [t.openai() for t in tools]
        else:
            messages = generic_messages(req.messages, tools)
        with self._lock:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **extra
            )
        return self.encode(str(text), add_special_tokens=False)

    def _checked_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValidationError("token_ids", "must not be empty")
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise ValidationError(
                    f"token_ids.ids[{i}]",
                    f"{t} is outside the vocabulary [0, {self.vocab_size})",
                )
        return list(ids)


def input_fields(req: GenerationRequest) -> list[str]:
    """The wire names of the inputs `req` sets (exactly one in a valid request)."""
    return [
        name
        for name, value in (
            ("prompt", req.prompt),
            ("chat", req.messages),
            ("token_ids", req.prompt_token_ids),
        )
        if value is not None
    ]
