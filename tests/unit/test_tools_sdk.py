"""The SDK's tool calling, without a server: the shapes tools, a tool choice and earlier
calls may be given in and the wire request they make, the checks made before sending,
a result's calls, and the CLI's flags and printing of calls."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason, Usage
from treadle.api.params import GenerationParams
from treadle.api.tools import Tool, ToolCall, ToolChoice
from treadle.client import AsyncClient, ChatMessage, InvalidArgument, call_arguments, tool
from treadle.client.cli import parse
from treadle.client.commands import _chat_turn
from treadle.client.results import Finish, SampleCollector, TokenChunk
from treadle.client.tool_flags import ToolFlags, print_calls
from treadle.client.tools import as_tool_choice
from treadle.v1 import treadle_pb2 as pb

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
COMPACT = json.dumps(PARAMETERS, separators=(",", ":"))
WEATHER = Tool("get_weather", "The weather in a city", COMPACT)
USER = [{"role": "user", "content": "Weather in Paris?"}]


class Forecast(pydantic.BaseModel):
    city: str
    days: int = 1


async def build(prompt: Any = None, **overrides: Any) -> pb.GenerateRequest:
    """The wire request the client would send (nothing is sent)."""
    async with AsyncClient() as client:
        return client.build_request(USER if prompt is None else prompt, None, None, "", overrides)


async def refused(limits: RequestLimits | None = None, **overrides: Any) -> InvalidArgument:
    async with AsyncClient(limits=limits) as client:
        with pytest.raises(InvalidArgument) as error:
            client.build_request(USER, None, None, "", overrides)
    assert error.value.code is None  # refused locally
    return error.value


# -- tools -------------------------------------------------------------------------------
def test_tool_takes_a_schema_dict_or_a_pydantic_model_class() -> None:
    assert tool("get_weather", PARAMETERS, "The weather in a city") == WEATHER
    assert json.loads(tool("forecast", Forecast).parameters) == Forecast.model_json_schema()
    assert tool("get_time") == Tool("get_time", "", "")  # no arguments
    with pytest.raises(TypeError, match="tool\\(\\) takes a JSON Schema dict"):
        tool("x", [1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "given",
    [
        WEATHER,
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": PARAMETERS,
                "strict": True,  # OpenAI's; a call is always constrained here
            },
        },
        {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
        {"name": "get_weather", "description": "The weather in a city", "parameters": COMPACT},
    ],
    ids=["Tool", "openai", "plain", "plain-json-text"],
)
async def test_each_tool_shape_makes_the_same_wire_tool(given: Any) -> None:
    msg = await build(tools=[given])
    (wire,) = msg.chat.tools
    assert (wire.name, wire.description, wire.parameters) == (
        WEATHER.name,
        WEATHER.description,
        COMPACT,
    )
    assert not msg.chat.HasField("tool_choice")  # unset: auto, since there are tools


async def test_a_pydantic_class_as_a_dicts_parameters() -> None:
    msg = await build(tools=[{"name": "forecast", "parameters": Forecast}])
    assert json.loads(msg.chat.tools[0].parameters) == Forecast.model_json_schema()


@pytest.mark.parametrize(
    ("given", "field", "message"),
    [
        ([{"description": "no name"}], "chat.tools[0].name", "must be a string"),
        (
            [{"type": "retrieval", "function": {"name": "x"}}],
            "chat.tools[0].type",
            "must be 'function', not 'retrieval'",
        ),
        (
            [{"name": "x", "parameters": 3}],
            "chat.tools[0].parameters",
            "must be a JSON Schema dict, a pydantic model class or JSON text, not int",
        ),
        (["get_weather"], "chat.tools[0]", "must be a Tool or a dict, not str"),
        ({"name": "x"}, "chat.tools", "must be a list of tools"),
        ([WEATHER, WEATHER], "chat.tools[1].name", "'get_weather' is given twice"),
        ([{"name": "bad name"}], "chat.tools[0].name", "must be 1-64 characters"),
    ],
)
async def test_a_malformed_tool_is_refused_naming_the_wire_field(
    given: Any, field: str, message: str
) -> None:
    error = await refused(tools=given)
    assert error.field == field and str(error).startswith(f"{field}: {message}")


async def test_tools_are_for_chat_input_only() -> None:
    async with AsyncClient() as client:
        with pytest.raises(InvalidArgument) as text:
            client.build_request("hi", None, None, "", {"tools": [WEATHER]})
        with pytest.raises(InvalidArgument) as ids:
            client.build_request(None, [1, 2], None, "", {"tool_choice": "none"})
    assert (text.value.field, ids.value.field) == ("chat.tools", "chat.tool_choice")


async def test_limits_known_from_model_info_are_checked_before_sending() -> None:
    limits = RequestLimits(max_tools=1, max_tools_bytes=30)
    error = await refused(limits, tools=[WEATHER, Tool("b")])
    assert str(error) == "chat.tools: at most 1 tools (got 2)"
    error = await refused(limits, tools=[WEATHER])
    size = len(WEATHER.name) + len(WEATHER.description) + len(COMPACT)
    assert str(error).startswith(f"chat.tools: are {size} bytes in all")
    many = [Tool(f"t{i}") for i in range(500)]
    assert len((await build(tools=many)).chat.tools) == 500  # limits unknown: the server's


async def test_a_server_without_tool_calling_refuses_tools_locally() -> None:
    error = await refused(RequestLimits(max_tools=0), tools=[WEATHER])
    assert str(error) == "chat.tools: this server has no tool calling"


# -- the tool choice ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "mode", "function"),
    [
        ("none", pb.ToolChoice.MODE_NONE, ""),
        ("auto", pb.ToolChoice.MODE_AUTO, ""),
        ("required", pb.ToolChoice.MODE_REQUIRED, ""),
        ("get_weather", pb.ToolChoice.MODE_FUNCTION, "get_weather"),
        (ToolChoice("function", "get_weather"), pb.ToolChoice.MODE_FUNCTION, "get_weather"),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            pb.ToolChoice.MODE_FUNCTION,
            "get_weather",
        ),
        ({"type": "required"}, pb.ToolChoice.MODE_REQUIRED, ""),
    ],
)
async def test_each_choice_shape_makes_its_wire_mode(given: Any, mode: int, function: str) -> None:
    msg = await build(tools=[WEATHER], tool_choice=given)
    assert (msg.chat.tool_choice.mode, msg.chat.tool_choice.function) == (mode, function)


def test_a_string_that_is_no_choice_word_names_a_tool() -> None:
    assert as_tool_choice("auto") == ToolChoice("auto")
    assert as_tool_choice("Auto") == ToolChoice("function", "Auto")
    assert as_tool_choice(None) is None


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("get_time", "chat.tool_choice: names 'get_time', which is not in chat.tools"),
        (3, "chat.tool_choice: must be a string or a ToolChoice, not int"),
        ({"type": "function"}, 'chat.tool_choice: a dict must be {"type": "function"'),
        (ToolChoice("any"), "chat.tool_choice: type 'any' is not one of none, auto"),
    ],
)
async def test_a_bad_choice_is_refused_naming_it(given: Any, message: str) -> None:
    error = await refused(tools=[WEATHER], tool_choice=given)
    assert error.field == "chat.tool_choice" and str(error).startswith(message)


async def test_required_needs_tools() -> None:
    error = await refused(tool_choice="required")
    assert str(error) == "chat.tool_choice: required needs chat.tools"


# -- messages with calls -----------------------------------------------------------------
def wire_calls(message: pb.ChatMessage) -> list[tuple[str, str, str]]:
    return [(c.id, c.name, c.arguments) for c in message.tool_calls]


@pytest.mark.parametrize(
    "assistant",
    [
        {  # OpenAI's shape, arguments as JSON text, content null
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {  # arguments as a dict, content absent
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {  # the plain shape
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}],
        },
        ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
    ],
    ids=["openai", "dict-arguments", "plain", "ChatMessage"],
)
async def test_each_call_shape_in_a_message_makes_the_same_wire_message(assistant: Any) -> None:
    answer = {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    msg = await build([*USER, assistant, answer], tools=[WEATHER])
    sent = msg.chat.messages
    assert (sent[1].role, sent[1].content) == ("assistant", "")
    assert wire_calls(sent[1]) == [("call_1", "get_weather", '{"city":"Paris"}')]
    assert (sent[2].role, sent[2].content, sent[2].tool_call_id) == ("tool", "sunny", "call_1")


async def test_a_results_calls_go_back_as_they_came() -> None:
    """The calls of a Finish, given back as an assistant message's, are sent unchanged."""
    calls = (ToolCall("call_9", "get_weather", '{"city": "Oslo"}'),)
    msg = await build([*USER, {"role": "assistant", "content": "", "tool_calls": calls}])
    assert wire_calls(msg.chat.messages[1]) == [("call_9", "get_weather", '{"city": "Oslo"}')]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "assistant", "tool_calls": {"id": "c"}}, "chat.messages[1].tool_calls"),
        ({"role": "assistant", "tool_calls": [{"id": "c"}]}, "chat.messages[1].tool_calls[0]"),
        (
            {"role": "assistant", "tool_calls": [{"name": "f", "arguments": 3}]},
            "chat.messages[1].tool_calls[0].arguments",
        ),
        ({"role": "tool", "content": "x", "tool_call_id": 5}, "chat.messages[1]"),
    ],
)
async def test_a_malformed_message_is_refused_naming_it(message: Any, field: str) -> None:
    async with AsyncClient() as client:
        with pytest.raises(InvalidArgument) as error:
            client.build_request([*USER, message], None, None, "", {})
    assert error.value.field == field


# -- results -----------------------------------------------------------------------------
def finish(index: int, calls: tuple[ToolCall, ...]) -> Finish:
    usage = Usage(5, 0, 9, 0.0, 0.01, 0.1)
    return Finish("r", FinishReason.EOS, usage, index=index, tool_calls=calls)


def test_a_result_exposes_each_samples_calls() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris", "days": 2}')
    collector = SampleCollector(2)
    for event in (
        TokenChunk("r", (1,), "Let me check.", index=0),
        finish(1, ()),
        finish(0, (call,)),
    ):
        collector.add(event)
    result = collector.result()
    assert result.tool_calls == (call,) and result.text == "Let me check."
    assert [s.tool_calls for s in result.samples] == [(call,), ()]
    assert call_arguments(call) == {"city": "Paris", "days": 2}
    assert call_arguments(ToolCall("c", "get_time", "")) == {}
    with pytest.raises(ValueError, match="not a JSON object"):
        call_arguments(ToolCall("c", "f", "[1]"))


# -- the CLI -----------------------------------------------------------------------------
def write_tools(tmp_path: Path, tools: Any, name: str = "tools.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(tools))
    return str(path)


def test_the_flags_read_a_tools_file_in_either_shape(tmp_path: Path) -> None:
    listed = [
        {"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}},
        {"name": "get_time", "description": "The time"},
    ]
    path = write_tools(tmp_path, listed)
    flags = parse(["chat", "--tools", path]).tool_flags
    assert flags == ToolFlags([Tool("get_weather", "", COMPACT), Tool("get_time", "The time")])
    assert flags.given
    chosen = parse(["generate", "hi", "--tools", path, "--tool-choice", "get_time"]).tool_flags
    assert chosen.choice == ToolChoice("function", "get_time")
    assert parse(["chat", "--tools", path, "--tool-choice", "required"]).tool_flags.choice == (
        ToolChoice("required")
    )
    assert parse(["chat"]).tool_flags == ToolFlags() and not ToolFlags().given


def test_tools_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps([{"name": "get_time"}])))
    assert parse(["generate", "hi", "--tools", "-"]).tool_flags.tools == [Tool("get_time")]


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as usage:
        parse(list(argv))
    assert usage.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_tool_flags_are_usage_errors_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    one = write_tools(tmp_path, {"name": "get_time"})
    tools = write_tools(tmp_path, [{"name": "get_time"}, {"name": "get_time"}], "twice.json")
    assert usage_error(capsys, "chat", "--tools", one) == (
        f"treadle: error: argument --tools: {one!r} holds a JSON object, not a list"
    )
    assert usage_error(capsys, "chat", "--tools", tools) == (
        "treadle: error: argument --tools: tools[1].name: 'get_time' is given twice"
    )
    assert usage_error(capsys, "chat", "--tool-choice", "required") == (
        "treadle: error: argument --tool-choice: tool_choice: required needs chat.tools"
    )
    assert usage_error(capsys, "generate", "-", "--tools", "-").endswith(
        "argument --tools: '-' reads stdin, which holds the prompt"
    )
    assert usage_error(capsys, "chat", "--tools", "-").endswith("which holds the conversation")
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(PARAMETERS)))  # the schema
    assert usage_error(capsys, "generate", "hi", "--json-schema", "-", "--tools", "-").endswith(
        "which holds the response format"
    )


def test_calls_are_printed_one_json_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    print_calls(
        (
            ToolCall("call_1", "get_weather", '{"city":"Zürich"}'),
            ToolCall("call_2", "get_time", "{}"),
        )
    )
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city":"Zürich"}'},
        {"id": "call_2", "name": "get_time", "arguments": "{}"},
    ]
    assert "Zürich" in lines[0]  # readable, not escaped


class ScriptedClient:
    """Answers each stream() with the next of `answers` and records its keywords."""

    def __init__(self, *answers: list[TokenChunk | Finish]) -> None:
        self.answers = list(answers)
        self.asked: list[dict[str, Any]] = []

    def stream(self, prompt: Any, **kwargs: Any) -> list[TokenChunk | Finish]:
        self.asked.append({"messages": list(prompt), **kwargs})
        return self.answers.pop(0)


def test_a_chat_turn_prints_the_calls_asks_their_results_and_answers_again(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    call = ToolCall("call_1", "get_weather", '{"city":"Paris"}')
    client = ScriptedClient(
        [TokenChunk("r", (1,), "Let me check."), finish(0, (call,))],
        [TokenChunk("r", (2,), "Sunny."), finish(0, ())],
    )
    prompts: list[str] = []

    def answer(prompt: str) -> str:
        prompts.append(prompt)
        return "21 C"

    monkeypatch.setattr("builtins.input", answer)
    flags = ToolFlags([WEATHER], ToolChoice("auto"))
    messages = [ChatMessage("user", "Weather in Paris?")]
    assert _chat_turn(client, messages, GenerationParams(), flags)  # type: ignore[arg-type]
    assert messages[1:] == [
        ChatMessage("assistant", "Let me check.", tool_calls=(call,)),
        ChatMessage("tool", "21 C", tool_call_id="call_1"),
        ChatMessage("assistant", "Sunny."),
    ]
    assert prompts == ["[get_weather call_1] result> "]
    assert [a["tools"] for a in client.asked] == [[WEATHER], [WEATHER]]
    assert client.asked[1]["messages"] == messages[:3]  # the result went back
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [
        "Let me check.",
        '{"id": "call_1", "name": "get_weather", "arguments": "{\\"city\\":\\"Paris\\"}"}',
    ]
