"""The structured-output flags of `treadle generate` and `treadle chat`: at most one of
--json-schema FILE, --json-object, --regex PATTERN, --choice TEXT (repeatable),
--grammar FILE. Files are read after parsing, so a bad one is a usage error naming
its flag."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..api.params import ResponseFormat
from .formats import choice, grammar, json_object, json_schema, regex


class FlagError(ValueError):
    """A flag's value is unusable; `str()` is "argument --flag: detail", as argparse says it."""

    def __init__(self, flag: str, detail: str) -> None:
        super().__init__(f"argument {flag}: {detail}")
        self.flag = flag


def add_format_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "response format (structured output, docs/structured-output.md; at most one)"
    )
    one = group.add_mutually_exclusive_group()
    one.add_argument(
        "--json-schema",
        metavar="FILE",
        help="the output is JSON valid against the JSON Schema in FILE ('-': stdin)",
    )
    one.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    one.add_argument("--regex", metavar="PATTERN", help="the output matches PATTERN whole")
    one.add_argument(
        "--choice",
        action="append",
        metavar="TEXT",
        help="the output is exactly one of the --choice values (repeatable)",
    )
    one.add_argument(
        "--grammar",
        metavar="FILE",
        help="the output follows the Lark grammar in FILE (llguidance dialect; '-': stdin)",
    )


def response_format_from_args(
    args: argparse.Namespace, stdin_holds: str | None = None
) -> ResponseFormat | None:
    """The format the flags ask for; None when none is given.

    Raises FlagError for a file that cannot be read (or is not UTF-8), a --json-schema
    file that is not a JSON object, or '-' when stdin already holds `stdin_holds`
    (e.g. "the prompt").
    """
    if args.json_schema is not None:
        schema = read_json_flag("--json-schema", args.json_schema, stdin_holds)
        if not isinstance(schema, dict):
            raise FlagError(
                "--json-schema",
                f"{shown_path(args.json_schema)} holds a JSON {json_kind(schema)}, "
                "not a schema object",
            )
        return json_schema(schema)
    if args.json_object:
        return json_object()
    if args.regex is not None:
        return regex(args.regex)
    if args.choice:
        return choice(args.choice)
    if args.grammar is not None:
        return grammar(read_flag_file("--grammar", args.grammar, stdin_holds))
    return None


def read_flag_file(flag: str, path: str, stdin_holds: str | None) -> str:
    """The text of the file a flag names ("-": stdin); raises FlagError when it cannot be
    read, is not UTF-8, or is "-" while stdin holds `stdin_holds`."""
    if path == "-":
        if stdin_holds is not None:
            raise FlagError(flag, f"'-' reads stdin, which holds {stdin_holds}")
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise FlagError(flag, f"{shown_path(path)} is not UTF-8 text") from None
    except OSError as exc:
        raise FlagError(flag, f"cannot read {shown_path(path)}: {exc.strerror or exc}") from None


def read_json_flag(flag: str, path: str, stdin_holds: str | None) -> Any:
    """The JSON value in the file a flag names; raises FlagError as read_flag_file does,
    and when the file is not JSON."""
    text = read_flag_file(flag, path, stdin_holds)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlagError(flag, f"{shown_path(path)} is not JSON: {exc}") from None


def json_kind(value: Any) -> str:
    """What JSON calls the kind of a parsed value ("array", "object", ...)."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def shown_path(path: str) -> str:
    return "stdin" if path == "-" else repr(path)


_JSON_KINDS: dict[type[Any], str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
