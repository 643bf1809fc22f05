"""Tool calling in the SDK: the shapes tools, a tool choice and earlier calls may be
given in, the checks made before sending, and reading a call's arguments.

    from treadle.client import Client, call_arguments, tool

    weather = tool("get_weather", {"type": "object", "properties": {...}}, "The weather")
    result = client.generate(messages, tools=[weather], tool_choice="auto")
    for call in result.tool_calls:
        print(call.name, call_arguments(call))

Tools are offered by a chat only (a list of messages). A tool may be a `Tool`, one
built with `tool()`, or a dict in OpenAI's shape (`{"type": "function", "function":
{...}}`) or a plain one (`{"name", "description", "parameters"}`). A malformed shape
raises ParameterError naming the wire field (`chat.tools[i]`, `chat.tool_choice`,
`chat.messages[i].tool_calls[j]`); the clients raise it as InvalidArgument. How the
server renders tools and constrains calls: docs/tools.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..api.checks import ParameterError, check_tools
from ..api.limits import RequestLimits
from ..api.tools import Tool, ToolCall, ToolChoice
from .formats import schema_text

ToolLike = Tool | Mapping[str, Any]  # a Tool, or an OpenAI-style or plain dict
ToolChoiceLike = str | ToolChoice | Mapping[str, Any]  # "none", "auto", "required", a name
CallLike = ToolCall | Mapping[str, Any]  # a ToolCall, or an OpenAI-style or plain dict

CHOICE_WORDS = ("none", "auto", "required")  # any other string names the tool to call
# What the checks mean by the server's limits before model_info() brought them: unknown,
# so counts and sizes are left to the server (names and the choice are still checked).
_UNKNOWN_LIMITS = RequestLimits(max_tools=sys.maxsize, max_tools_bytes=sys.maxsize)


def tool(
    name: str, parameters: Mapping[str, Any] | type | None = None, description: str = ""
) -> Tool:
    """A function the model may call. `parameters` is the JSON Schema of its arguments:
    a dict, or a pydantic model class (its `model_json_schema()`); None: no arguments."""
    return Tool(name, description, "" if parameters is None else schema_text(parameters, "tool()"))


def call_arguments(call: ToolCall) -> dict[str, Any]:
    """A call's arguments, parsed (they travel as JSON text); raises ValueError when they
    are not a JSON object (never for a call the server parsed from the model's output)."""
    arguments = json.loads(call.arguments or "{}")
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of the call of {call.name!r} are not a JSON object")
    return arguments


def chat_tools(
    tools: Sequence[ToolLike],
    choice: ToolChoiceLike | None,
    limits: RequestLimits | None,
) -> tuple[list[Tool], ToolChoice | None]:
    """The tools and tool choice of a request, converted and checked as the server checks
    them (check_tools; counts and sizes against `limits` when known). A server whose
    ModelInfo reports max_tools 0 predates tool calling: it would ignore the tools, so
    they are refused here. Raises ParameterError naming the wire field."""
    if isinstance(tools, str | Mapping):  # one tool, not a list of them
        raise ParameterError("chat.tools", "must be a list of tools")
    converted = [as_tool(t, f"chat.tools[{i}]") for i, t in enumerate(tools)]
    tool_choice = as_tool_choice(choice)
    if converted and limits is not None and limits.max_tools == 0:
        raise ParameterError("chat.tools", "this server has no tool calling")
    check_tools(converted, tool_choice, limits or _UNKNOWN_LIMITS, field="chat.tools")
    return converted, tool_choice


def as_tool(spec: ToolLike, field: str) -> Tool:
    """A Tool from a Tool or a dict: OpenAI's `{"type": "function", "function": {"name",
    "description", "parameters"}}` or the plain `{"name", "description", "parameters"}`;
    `parameters` is a dict, a pydantic model class or JSON text. Other keys (OpenAI's
    `strict`) are ignored: a call is always constrained to its schema."""
    if isinstance(spec, Tool):
        return spec
    if not isinstance(spec, Mapping):
        raise ParameterError(field, f"must be a Tool or a dict, not {type(spec).__name__}")
    if "function" in spec:
        if spec.get("type", "function") != "function":
            raise ParameterError(f"{field}.type", f"must be 'function', not {spec['type']!r}")
        spec, field = spec["function"], f"{field}.function"
        if not isinstance(spec, Mapping):
            raise ParameterError(field, "must be a dict")
    name, description = spec.get("name"), spec.get("description") or ""
    if not isinstance(name, str):
        raise ParameterError(f"{field}.name", "must be a string")
    if not isinstance(description, str):
        raise ParameterError(f"{field}.description", "must be a string")
    return Tool(name, description, _parameters(spec.get("parameters"), f"{field}.parameters"))


def as_tool_choice(choice: ToolChoiceLike | None) -> ToolChoice | None:
    """A ToolChoice from "none", "auto", "required", any other string (the name of the
    one tool to call), OpenAI's `{"type": "function", "function": {"name": ...}}` or a
    ToolChoice; None stays None (auto when there are tools)."""
    field = "chat.tool_choice"
    if choice is None or isinstance(choice, ToolChoice):
        return choice
    if isinstance(choice, str):
        return ToolChoice(choice) if choice in CHOICE_WORDS else ToolChoice("function", choice)
    if isinstance(choice, Mapping):
        function = choice.get("function")
        if choice.get("type") == "function" and isinstance(function, Mapping):
            return ToolChoice("function", str(function.get("name", "")))
        if choice.get("type") in CHOICE_WORDS and function is None:
            return ToolChoice(choice["type"])
        raise ParameterError(field, 'a dict must be {"type": "function", "function": {"name"}}')
    raise ParameterError(field, f"must be a string or a ToolChoice, not {type(choice).__name__}")


def as_call(call: CallLike, field: str) -> ToolCall:
    """A ToolCall from a ToolCall or a dict: OpenAI's `{"id", "type": "function",
    "function": {"name", "arguments"}}` or the plain `{"id", "name", "arguments"}`;
    `arguments` is JSON text or a dict (sent as compact JSON text)."""
    if isinstance(call, ToolCall):
        return call
    if not isinstance(call, Mapping):
        raise ParameterError(field, f"must be a ToolCall or a dict, not {type(call).__name__}")
    call_id = call.get("id") or ""
    body = call.get("function", call)
    if not isinstance(body, Mapping):
        raise ParameterError(f"{field}.function", "must be a dict")
    name, arguments = body.get("name"), body.get("arguments", "")
    if not isinstance(name, str) or not isinstance(call_id, str):
        raise ParameterError(field, "needs a string name (and a string id)")
    if isinstance(arguments, Mapping):
        arguments = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(arguments, str):
        raise ParameterError(f"{field}.arguments", "must be JSON text or a dict")
    return ToolCall(call_id, name, arguments)


def _parameters(parameters: Any, field: str) -> str:
    if parameters is None or isinstance(parameters, str):
        return parameters or ""
    try:
        return schema_text(parameters, field)
    except TypeError:
        kind = type(parameters).__name__
        detail = f"must be a JSON Schema dict, a pydantic model class or JSON text, not {kind}"
        raise ParameterError(field, detail) from None
