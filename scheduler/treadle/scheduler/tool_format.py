"""The tool-call format: how tools and calls appear in the prompt and in the output.

treadle speaks the Hermes format, the one of Qwen2.5/Qwen3, Hermes and SmolLM3
among others: the model writes each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that takes tools (its source mentions `tools`) renders them and
the history's calls itself; for any other template the tools are described in
the system message in that format (`generic_messages`). The grammar of a call
(`call_grammar`) constrains what the model writes, and `parse_calls` reads the
calls back out of the output. docs/tools.md.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..api.bounded_json import JsonLimitError, loads_bounded
from ..api.images import TextPart
from ..api.params import ChatMessage
from ..api.tools import Tool, ToolCall, ToolChoice
from ..worker.grammar import JSON_WHITESPACE
from .errors import ValidationError

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
MAX_SCHEMA_DEPTH = 64  # nesting of a tool's parameters schema
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

GENERIC_INSTRUCTIONS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def message_text(m: ChatMessage) -> str:
    """A message's text: its content, or its text parts joined."""
    return m.content or "".join(p.text for p in m.parts if isinstance(p, TextPart))


Content = Callable[[ChatMessage], Any]  # a message's content as the chat template takes it


@dataclass(frozen=True)
class ToolSpec:
    """A tool with its parameters schema parsed."""

    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The tool as chat templates take it (OpenAI's function-tool shape)."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": {**function, "parameters": self.parameters}}


def parse_tools(tools: Sequence[Tool], max_bytes: int, field: str = "chat.tools") -> list[ToolSpec]:
    """The tools with their parameters parsed (their sizes were checked). Raises
    ValidationError naming `{field}[i].parameters` for one that is not a JSON object."""
    specs = []
    for i, tool in enumerate(tools):
        parameters = NO_PARAMETERS
        if tool.parameters:
            parameters = _json_object(f"{field}[{i}].parameters", tool.parameters, max_bytes)
        specs.append(ToolSpec(tool.name, tool.description, parameters))
    return specs


def call_grammar(tools: Sequence[ToolSpec], choice: ToolChoice) -> str | None:
    """The llguidance Lark grammar of what the output may be under `choice`; None for
    `none` (unconstrained).

    - auto: any text, or text followed by calls: once the model writes the opening
      marker the rest must be calls (the lazy `pre` ends at the marker's first
      occurrence, so text can never contain it);
    - required: one or more calls; function: one call of the named tool.
    Between calls and around them, a little whitespace.
    """
    if choice.type == "none":
        return None
    if choice.type == "function":
        tools = [t for t in tools if t.name == choice.name]
    body = {"anyOf": [_call_schema(t) for t in tools], "x-guidance": _JSON_OPTIONS}
    rest = (
        f"calls: call ({_q(OPEN)} call)*\n"
        f"call: WS body WS {_q(CLOSE)} WS\n"
        f"body: %json {json.dumps(body)}\n"
        "WS: /[ \\t\\r\\n]{0,4}/\n"
    )
    if choice.type == "auto":
        start = f"start: text | pre calls\npre[lazy]: /(?s:.*)/ {_q(OPEN)}\ntext: /(?s:.+)/\n"
    elif choice.type == "required":
        start = f"start: {_q(OPEN)} calls\n"
    else:
        start = f"start: {_q(OPEN)} call\n"
    return start + rest


def parse_calls(text: str) -> tuple[tuple[ToolCall, ...], int]:
    """The complete calls at the start of `text` (the output from its first opening marker
    on) and where they end: whitespace, then any number of `<tool_call> {"name": str,
    "arguments": object} </tool_call>`. What follows them (a call cut short, say) is
    not a call."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    end = at = _skip_space(text, 0)
    while text.startswith(OPEN, at):
        try:
            body, at = decoder.raw_decode(text, _skip_space(text, at + len(OPEN)))
        except (ValueError, RecursionError):
            break
        at = _skip_space(text, at)
        if not text.startswith(CLOSE, at) or not _is_call(body):
            break
        arguments = json.dumps(body["arguments"], ensure_ascii=False)
        calls.append(ToolCall(id=new_call_id(), name=body["name"], arguments=arguments))
        end = at = _skip_space(text, at + len(CLOSE))
    return tuple(calls), end if calls else 0


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def generic_messages(
    messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], content: Content = message_text
) -> list[dict[str, Any]]:
    """The chat for a template without tool support: the tools described in the system
    message (the first message if it is one, else a new one), each earlier call written
    into its assistant message as the model would write it, and tool results as a user
    message of `<tool_response>` blocks (consecutive ones together). `content` gives a
    message's content (its text, or its parts as a template takes them)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        calls = _history_calls(i, m)
        if m.role == "tool":
            block = f"<tool_response>\n{message_text(m)}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
            continue
        if not calls:
            out.append({"role": m.role, "content": content(m)})
            continue
        text = message_text(m)
        for call in calls:
            written = f"{OPEN}\n{json.dumps(call['function'], ensure_ascii=False)}\n{CLOSE}"
            text = f"{text}\n{written}" if text else written
        out.append({"role": m.role, "content": text})
    for d in out:
        d.pop("tool_results", None)
    if tools:
        listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
        system = GENERIC_INSTRUCTIONS.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{system}"
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def template_messages(
    messages: Sequence[ChatMessage], content: Content = message_text
) -> list[dict[str, Any]]:
    """The chat for a template that takes tools: OpenAI's message shape, the history's
    call arguments as objects (what templates expect)."""
    out = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role, "content": content(m)}
        if m.tool_calls:
            d["tool_calls"] = _history_calls(i, m)
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _history_calls(index: int, m: ChatMessage) -> list[dict[str, Any]]:
    """The calls of chat message `index`, arguments parsed (their size was checked with
    the chat's); only an assistant calls."""
    field = f"chat.messages[{index}].tool_calls"
    if m.tool_calls and m.role != "assistant":
        raise ValidationError(field, f"only an assistant message makes calls, not {m.role!r}")
    calls = []
    for j, call in enumerate(m.tool_calls):
        arguments = _json_object(f"{field}[{j}].arguments", call.arguments or "{}")
        function = {"name": call.name, "arguments": arguments}
        calls.append({"id": call.id, "type": "function", "function": function})
    return calls


def _json_object(field: str, text: str, max_bytes: int | None = None) -> dict[str, Any]:
    """`text` parsed as a JSON object, nested at most MAX_SCHEMA_DEPTH deep and at most
    `max_bytes` long (None: its size is bounded already)."""
    if max_bytes is None:
        max_bytes = len(text.encode("utf-8", "surrogatepass"))
    try:
        value = loads_bounded(text, max_bytes, MAX_SCHEMA_DEPTH)
    except JsonLimitError as exc:
        raise ValidationError(field, str(exc)) from exc
    if not isinstance(value, dict):
        raise ValidationError(field, "must be a JSON object")
    return value


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _is_call(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and body.keys() == {"name", "arguments"}
        and isinstance(body["name"], str)
        and isinstance(body["arguments"], dict)
    )


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _q(literal: str) -> str:
    return json.dumps(literal)


_JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}
