"""Turning a request's input (prompt, chat messages or token ids) into prompt token ids,
and a vision-language model's chat images into the tensors its vision tower takes."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..api.images import TextPart
from ..api.params import ChatMessage
from ..worker.vision import ImageInputs
from .errors import ValidationError
from .generation_request import GenerationRequest
from .images import DecodedImage
from .tool_format import ToolSpec, generic_messages, message_text, template_messages

_TEXT_OUTPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


@dataclass
class Prompt:
    ids: list[int]
    images: ImageInputs | None = None  # with a vision-language model's images


class InputProcessor:
    """Tokenizes request inputs on the caller's thread.

    Holds its own copy of the tokenizer, so encoding never shares a Rust
    tokenizer with the step thread's detokenizers, and a lock for callers
    on several threads.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        processor: Any = None,
        image_token_id: int | None = None,
    ) -> None:
        self.processor = copy.deepcopy(processor)  # a vision-language model's, else None
        self.tokenizer = self.processor.tokenizer if processor else copy.deepcopy(tokenizer)
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        self._lock = threading.Lock()

    @property
    def _templates(self) -> Any:
        """What renders chats: the processor when it has a chat template, else the tokenizer."""
        if self.processor is not None and getattr(self.processor, "chat_template", None):
            return self.processor
        return self.tokenizer

    @property
    def accepts_images(self) -> bool:
        return self.processor is not None and self.image_token_id is not None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._templates, "chat_template", None))

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders tools and calls itself (else treadle writes
        them in its generic format: tool_format.py)."""
        return "tools" in str(getattr(self._templates, "chat_template", None) or "")

    def prompt_ids(self, req: GenerationRequest, tools: Sequence[ToolSpec] = ()) -> list[int]:
        """The prompt's token ids (as `prompt`, without images)."""
        return self.prompt(req, tools).ids

    def prompt(
        self,
        req: GenerationRequest,
        tools: Sequence[ToolSpec] = (),
        images: Sequence[DecodedImage] = (),
    ) -> Prompt:
        """The prompt's token ids, a chat rendered with `tools` (the request's, parsed) and
        its `images` (decoded, in order: a vision-language model's processor expands each
        image's placeholder into its image tokens); raises ValidationError naming the
        input's wire field (`prompt`, `chat`, `token_ids`: `prompt`, `messages`,
        `prompt_token_ids` here)."""
        given = input_fields(req)
        if len(given) != 1:
            raise ValidationError(
                "input",
                "exactly one of prompt, chat, token_ids must be set"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if req.prompt_token_ids is not None:
            return Prompt(self._checked_ids(req.prompt_token_ids))
        if req.messages is not None:
            return self._render_chat(req, tools, images)
        assert req.prompt is not None
        if not req.prompt:
            raise ValidationError("prompt", "must not be empty")
        return Prompt(self.encode(req.prompt, add_special_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _render_chat(
        self, req: GenerationRequest, tools: Sequence[ToolSpec], images: Sequence[DecodedImage]
    ) -> Prompt:
        assert req.messages is not None
        if not req.messages:
            raise ValidationError("chat", "must not be empty")
        for i, m in enumerate(req.messages):
            if not m.role:
                raise ValidationError(f"chat.messages[{i}].role", "must not be empty")
        if not self.has_chat_template:
            raise ValidationError("chat", "the model has no chat template; send a prompt")
        extra: dict[str, Any] = {}
        content = _parts if self.processor is not None else message_text
        if self.template_takes_tools:
            messages = template_messages(req.messages, content)
            if tools:
                extra["tools"] = [t.openai() for t in tools]
        else:
            messages = generic_messages(req.messages, tools, content)
        if self.processor is not None:  # its templates take a list of parts
            for d in messages:
                if isinstance(d["content"], str):
                    d["content"] = [{"type": "text", "text": d["content"]}]
        with self._lock:
            text = str(
                self._templates.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **extra
                )
            )
        if not images:
            return Prompt(self.encode(text, add_special_tokens=False))
        return self._with_images(text, images)

    def _with_images(self, text: str, images: Sequence[DecodedImage]) -> Prompt:
        """The processor's ids for `text` and `images`, and the images' tensors."""
        assert self.processor is not None and self.image_token_id is not None
        pictures = [d.image for d in images]
        with self._lock:
            out = self.processor(
                text=text, images=pictures, return_tensors="pt", add_special_tokens=False
            )
        ids = [int(t) for t in out["input_ids"][0]]
        pixels = {
            k: v for k, v in out.items() if k not in _TEXT_OUTPUTS and isinstance(v, torch.Tensor)
        }
        digests = [d.digest for d in images]
        return Prompt(ids, ImageInputs.build(pixels, ids, self.image_token_id, digests))

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


def _parts(m: ChatMessage) -> Any:
    """A message's content as a processor's chat template takes it: a list of parts, each
    image a placeholder (the image itself goes to the processor beside the text)."""
    if not m.parts:
        return [{"type": "text", "text": m.content}]
    return [
        {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
        for p in m.parts
    ]
