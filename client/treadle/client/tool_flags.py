"""The tool-calling flags of `treadle generate` and `treadle chat`: --tools FILE (a JSON
list of tools, each in OpenAI's shape or the plain one) and --tool-choice
none|auto|required|NAME. Read and checked after parsing, so a bad value is a usage
error naming its flag; the calls a model makes are printed as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from ..api.checks import ParameterError
from ..api.tools import Tool, ToolCall, ToolChoice
from .format_flags import FlagError, json_kind, read_json_flag, shown_path
from .tools import chat_tools


@dataclass(frozen=True)
class ToolFlags:
    """What the tool flags ask for: the tools a chat offers and the tool choice."""

    tools: list[Tool] = field(default_factory=list)
    choice: ToolChoice | None = None  # None: auto when there are tools

    @property
    def given(self) -> bool:
        """Whether either flag was given (tool calling needs a chat input)."""
        return bool(self.tools) or self.choice is not None


def add_tool_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("tool calling (docs/tools.md)")
    group.add_argument(
        "--tools",
        metavar="FILE",
        help="offer the tools in FILE, a JSON list of tools: "
        '{"type": "function", "function": {"name", "description", "parameters"}} '
        '(OpenAI) or {"name", "description", "parameters"} (\'-\': stdin); each call '
        "the model makes is printed after the text as a JSON line {id, name, arguments}",
    )
    group.add_argument(
        "--tool-choice",
        metavar="none|auto|required|NAME",
        help="no call, text or calls (the default with --tools), one or more calls, "
        "or exactly one call of the tool NAME",
    )


def tool_flags_from_args(args: argparse.Namespace, stdin_holds: str | None = None) -> ToolFlags:
    """The tools and tool choice the flags ask for, checked as the SDK checks them (names,
    the choice; counts and sizes are the server's). Raises FlagError for a --tools file
    that cannot be read, is not a JSON list of tools, or is '-' while stdin holds
    `stdin_holds`, and for a --tool-choice that names no tool or needs tools."""
    listed: list[Any] = []
    if args.tools is not None:
        value = read_json_flag("--tools", args.tools, stdin_holds)
        if not isinstance(value, list):
            detail = f"{shown_path(args.tools)} holds a JSON {json_kind(value)}, not a list"
            raise FlagError("--tools", detail)
        listed = value
    try:
        tools, choice = chat_tools(listed, args.tool_choice, None)
    except ParameterError as exc:
        flag = "--tool-choice" if exc.field == "chat.tool_choice" else "--tools"
        raise FlagError(flag, str(exc).removeprefix("chat.")) from None
    return ToolFlags(tools, choice)


def print_calls(calls: tuple[ToolCall, ...]) -> None:
    """One JSON line per call on stdout: {"id", "name", "arguments"} (arguments as the JSON
    text the server sent, as in the SDK's ToolCall)."""
    for call in calls:
        line = {"id": call.id, "name": call.name, "arguments": call.arguments}
        print(json.dumps(line, ensure_ascii=False), file=sys.stdout, flush=True)
