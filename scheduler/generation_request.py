"""The engine's input: one generation request as a client states it.

Plain data; the gRPC frontend converts protobuf messages into this at the
edge. `validation.py` checks it against the model and the server's limits and
turns it into the scheduler's `Request`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant", ...
    content: str


@dataclass(frozen=True, slots=True)
class PluginRequest:
    """A server-side plugin enabled for this request, with its JSON arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class GenerationRequest:
    """Exactly one of `prompt`, `messages`, `prompt_token_ids` gives the input."""

    prompt: str | None = None  # raw text, tokenized as is
    messages: list[ChatMessage] | None = None  # rendered with the model's chat template
    prompt_token_ids: list[int] | None = None
    request_id: str | None = None  # chosen by the client, or assigned by the engine

    # stopping
    max_new_tokens: int | None = None  # None: the server default, within the context
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)  # stop strings, matched across tokens
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_in_output: bool = False  # keep the matched stop string / token text
    max_time: float | None = None  # seconds of generation before finishing with time_limit
    deadline: float | None = None  # seconds from arrival before the request is cancelled

    # logits processing and choice
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words: list[str] = field(default_factory=list)  # text, tokenized server-side
    bad_words_ids: list[list[int]] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    # output
    logprobs: bool = False
    top_logprobs: int = 0
    processed_logprobs: bool = False  # logprobs after processors/warpers instead of raw
    skip_special_tokens: bool = True

    priority: int = 0  # larger is admitted first
    plugins: list[PluginRequest] = field(default_factory=list)
