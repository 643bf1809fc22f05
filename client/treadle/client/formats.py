"""Helpers that build a request's `response_format` (structured output).

    from treadle.client import Client, json_schema
    client.generate(prompt, response_format=json_schema({"type": "object", ...}))

Each returns a `ResponseFormat`; the server compiles it and refuses one it cannot
(InvalidArgument, field `response_format`). pydantic is optional: a model class is
recognised by its `model_json_schema()` method, never imported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..api.checks import ParameterError
from ..api.params import ResponseFormat


def json_schema(schema: Mapping[str, Any] | type) -> ResponseFormat:
    """Output that is JSON valid against `schema`: a JSON Schema as a dict, or a pydantic
    model class (its `model_json_schema()`). Sent as compact JSON text, keys in order
    (the order the model writes properties in)."""
    return ResponseFormat("json_schema", value=schema_text(schema, "json_schema()"))


def schema_text(schema: Mapping[str, Any] | type, taker: str) -> str:
    """A JSON Schema dict or a pydantic model class as compact JSON text, keys in order;
    raises TypeError naming `taker` (e.g. "json_schema()") for anything else."""
    to_schema = getattr(schema, "model_json_schema", None)
    document = to_schema() if callable(to_schema) else schema
    if not isinstance(document, Mapping):
        raise TypeError(
            f"{taker} takes a JSON Schema dict or a pydantic model class, "
            f"not {type(schema).__name__}"
        )
    return json.dumps(document, separators=(",", ":"))


def json_object() -> ResponseFormat:
    """Output that is any JSON object."""
    return ResponseFormat("json_object")


def regex(pattern: str) -> ResponseFormat:
    """Output that the regular expression `pattern` matches whole (Rust `regex` syntax:
    no lookaround, no backreferences)."""
    return ResponseFormat("regex", value=pattern)


def grammar(text: str) -> ResponseFormat:
    """Output in the language of a grammar in llguidance's Lark dialect
    (docs/structured-output.md)."""
    return ResponseFormat("grammar", value=text)


def choice(options: Iterable[str]) -> ResponseFormat:
    """Output that is exactly one of `options` (strings)."""
    if isinstance(options, str):
        raise TypeError("choice() takes the options as a list of strings, not one string")
    choices = tuple(options)
    if not all(isinstance(c, str) for c in choices):
        raise TypeError("choice() options must be strings")
    return ResponseFormat("choice", choices=choices)


def check_format_accepted(f: ResponseFormat | None, accepted: tuple[str, ...] | None) -> None:
    """Refuse a response format of a type the server does not accept (`accepted`, from
    ModelInfo; None: not known, so not checked). A server that predates structured
    output accepts none: it would ignore the field and answer unconstrained."""
    if f is None or accepted is None or f.type in accepted:
        return
    if not accepted:
        raise ParameterError("response_format", "this server has no structured output")
    accepts = ", ".join(accepted)
    raise ParameterError("response_format", f"this server accepts {accepts}, not {f.type}")
