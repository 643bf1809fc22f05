"""Generation parameters: the same names, defaults and meaning on both sides of the wire.

The SDK builds requests from these; the server's `GenerationRequest` extends
`GenerationParams` with the input, so a field is declared once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .images import ContentPart
from .tools import ToolCall


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant", "tool", ...
    content: str  # the text; "" when `parts` gives the content
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message: the calls it made
    tool_call_id: str = ""  # a "tool" message: the id of the call it answers
    parts: tuple[ContentPart, ...] = ()  # text and images in order, instead of `content`


@dataclass(frozen=True, slots=True)
class PluginRequest:
    """A server-side plugin enabled for a request, with its JSON arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


RESPONSE_FORMAT_TYPES = ("json_schema", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What the output must be (constrained decoding); `type` is one of RESPONSE_FORMAT_TYPES.

    - json_schema: `value` is a JSON Schema document (JSON text); the output is JSON valid
      against it;
    - json_object: any JSON object (`value` empty);
    - regex: `value` is a regular expression the whole output matches (Rust `regex` syntax:
      no lookaround, no backreferences);
    - grammar: `value` is a grammar in llguidance's Lark dialect (docs/structured-output.md);
    - choice: the output is exactly one of `choices`.
    """

    type: str
    value: str = ""
    choices: tuple[str, ...] = ()


@dataclass(slots=True)
class GenerationParams:
    """Everything about a request but its input; the defaults change nothing (greedy)."""

    # stopping
    max_new_tokens: int | None = None  # None: the server default, within the context
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)  # stop strings, matched across tokens
    stop_token_ids: list[int] = field(default_factory=list)
    # token-id sequences that end the output (like stop strings, matched on ids; held back)
    stop_token_sequences: list[list[int]] = field(default_factory=list)
    include_stop_in_output: bool = False  # keep the matched stop string / token text
    max_time: float | None = None  # seconds of generation before finishing with time_limit

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

    n: int = 1  # samples of the prompt; sample i is seeded with seed + i when seed is set
    priority: int = 0  # larger is admitted first
    plugins: list[PluginRequest] = field(default_factory=list)
    response_format: ResponseFormat | None = None  # None: unconstrained
