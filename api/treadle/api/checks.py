"""Checks of generation parameters that need no model: shared by the SDK and the server.

Both sides raise the same messages: the field's name, then the limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .limits import RequestLimits
from .params import RESPONSE_FORMAT_TYPES, GenerationParams, ResponseFormat
from .tools import TOOL_CHOICE_TYPES, TOOL_NAME, Tool, ToolChoice

MAX_SEED = 2**63 - 1


class ParameterError(ValueError):
    """A parameter is out of its range. `str()` is "field: detail"."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def check_params(p: GenerationParams, limits: RequestLimits | None = None) -> None:
    """Raise ParameterError for the first parameter out of range.

    Counts (stop strings, plugins, ...) are checked against `limits` when given;
    what depends on the model (vocabulary, context) is the server's to check.
    """
    if p.max_new_tokens is not None and p.max_new_tokens < 1:
        raise ParameterError("max_new_tokens", f"must be at least 1 (got {p.max_new_tokens})")
    check_count("min_new_tokens", p.min_new_tokens, 0, p.max_new_tokens or 2**31)
    for i, s in enumerate(p.stop):
        if not s:
            raise ParameterError(f"stop[{i}]", "must not be empty")
    check_seconds("max_time", p.max_time)
    check_range("temperature", p.temperature, 0.0, 100.0)
    check_range("top_p", p.top_p, 0.0, 1.0, low_open=True)
    check_range("min_p", p.min_p, 0.0, 1.0)
    check_range("typical_p", p.typical_p, 0.0, 1.0, low_open=True)
    check_range("repetition_penalty", p.repetition_penalty, 0.0, 100.0, low_open=True)
    check_range("presence_penalty", p.presence_penalty, -2.0, 2.0)
    check_range("frequency_penalty", p.frequency_penalty, -2.0, 2.0)
    check_count("top_k", p.top_k, 0, 2**31)
    check_count("no_repeat_ngram_size", p.no_repeat_ngram_size, 0, 64)
    if p.seed is not None:
        check_count("seed", p.seed, 0, MAX_SEED)
    for token, bias in p.logit_bias.items():
        check_range(f"logit_bias[{token}]", bias, -100.0, 100.0)
    for i, seq in enumerate(p.stop_token_sequences):
        if not seq:
            raise ParameterError(f"stop_token_sequences[{i}]", "must not be empty")
    for i, ids in enumerate(p.bad_words_ids):
        if not ids:
            raise ParameterError(f"bad_words_ids[{i}]", "must not be empty")
    for i, word in enumerate(p.bad_words):
        if not word:
            raise ParameterError(f"bad_words[{i}]", "must not be empty")
    check_count("top_logprobs", p.top_logprobs, 0, 2**31)
    check_count("n", p.n, 1, 2**31)
    if p.response_format is not None:
        check_response_format(p.response_format)
        if p.ignore_eos:
            raise ParameterError(
                "response_format", "cannot be combined with ignore_eos (the format ends the output)"
            )
    if limits is not None:
        check_limits(p, limits)


def check_response_format(f: ResponseFormat) -> None:
    """The format's shape (its content is the server's to compile)."""
    if f.type not in RESPONSE_FORMAT_TYPES:
        raise ParameterError(
            "response_format", f"type {f.type!r} is not one of {', '.join(RESPONSE_FORMAT_TYPES)}"
        )
    if f.type == "choice":
        if not f.choices or any(not c for c in f.choices):
            raise ParameterError("response_format", "choice needs non-empty choices")
    elif f.choices:
        raise ParameterError("response_format", f"choices are for type choice, not {f.type}")
    if f.type in ("json_schema", "regex", "grammar") and not f.value:
        raise ParameterError("response_format", f"{f.type} needs a value")
    if f.type in ("json_object", "choice") and f.value:
        raise ParameterError("response_format", f"{f.type} takes no value")


def check_limits(p: GenerationParams, lim: RequestLimits) -> None:
    """The per-request limits a server enforces (defaults in RequestLimits)."""
    _check_most("stop", len(p.stop), lim.max_stop_strings, "stop strings")
    for i, s in enumerate(p.stop):
        if len(s) > lim.max_stop_string_chars:
            raise ParameterError(
                f"stop[{i}]", f"is longer than {lim.max_stop_string_chars} characters"
            )
    _check_most("stop_token_ids", len(p.stop_token_ids), lim.max_stop_token_ids, "ids")
    _check_most(
        "stop_token_sequences",
        len(p.stop_token_sequences),
        lim.max_stop_token_sequences,
        "sequences",
    )
    for i, seq in enumerate(p.stop_token_sequences):
        _check_most(f"stop_token_sequences[{i}]", len(seq), lim.max_stop_token_sequence_len, "ids")
    _check_most(
        "bad_words",
        len(p.bad_words) + len(p.bad_words_ids),
        lim.max_bad_words,
        "entries with bad_words_ids",
    )
    _check_most("logit_bias", len(p.logit_bias), lim.max_logit_bias, "entries")
    _check_most("allowed_token_ids", len(p.allowed_token_ids), lim.max_allowed_token_ids, "ids")
    check_count("top_logprobs", p.top_logprobs, 0, lim.max_top_logprobs)
    if p.response_format is not None:
        f = p.response_format
        size = len(f.value.encode()) + sum(len(c.encode()) for c in f.choices)
        if size > lim.max_response_format_bytes:
            raise ParameterError(
                "response_format", f"is {size} bytes; the limit is {lim.max_response_format_bytes}"
            )
        _check_most("response_format", len(f.choices), lim.max_response_format_choices, "choices")
    check_count("n", p.n, 1, lim.max_samples)
    _check_most("plugins", len(p.plugins), lim.max_plugins, "plugins")


def check_tools(
    tools: Sequence[Tool], choice: ToolChoice | None, limits: RequestLimits, field: str = "tools"
) -> None:
    """Raise ParameterError for tools or a tool choice that are malformed or over a limit:
    counts and sizes only (whether a schema compiles is the server's to check). `field`
    is the wire name of the tool list; the choice is named `tool_choice` beside it."""
    choice_field = field.removesuffix("tools") + "tool_choice"
    if len(tools) > limits.max_tools:
        raise ParameterError(field, f"at most {limits.max_tools} tools (got {len(tools)})")
    size = sum(len(f.encode()) for t in tools for f in (t.name, t.description, t.parameters))
    if size > limits.max_tools_bytes:
        raise ParameterError(
            field,
            f"are {size} bytes in all (names, descriptions, parameters); "
            f"the limit is {limits.max_tools_bytes}",
        )
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not TOOL_NAME.fullmatch(tool.name):
            raise ParameterError(
                f"{field}[{i}].name", "must be 1-64 characters of A-Z, a-z, 0-9, _ and -"
            )
        if tool.name in seen:
            raise ParameterError(f"{field}[{i}].name", f"{tool.name!r} is given twice")
        seen.add(tool.name)
    if choice is None:
        return
    if choice.type not in TOOL_CHOICE_TYPES:
        raise ParameterError(
            choice_field, f"type {choice.type!r} is not one of {', '.join(TOOL_CHOICE_TYPES)}"
        )
    if choice.type == "function":
        if choice.name not in seen:
            raise ParameterError(choice_field, f"names {choice.name!r}, which is not in {field}")
    elif choice.name:
        raise ParameterError(choice_field, f"a name is for type function, not {choice.type}")
    if choice.type == "required" and not tools:
        raise ParameterError(choice_field, f"required needs {field}")


def check_range(
    field: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ParameterError(field, f"must be within {bracket}{low}, {high}] (got {value})")


def check_count(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ParameterError(field, f"must be within [{low}, {high}] (got {value})")


def _check_most(field: str, count: int, most: int, what: str) -> None:
    if count > most:
        raise ParameterError(field, f"at most {most} {what} (got {count})")


def check_seconds(field: str, value: float | None) -> None:
    """None, or a finite positive number of seconds."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ParameterError(field, f"must be a positive number of seconds (got {value})")
