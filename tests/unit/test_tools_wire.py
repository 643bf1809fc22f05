"""Tool calling at the edge: tools, the tool choice and earlier calls from the SDK over
the wire to the engine's GenerationRequest, a FinishEvent's calls back to the SDK, the
limits ModelInfo reports, and refusals naming chat.tools[...] / chat.tool_choice,
some through a real gRPC server on the tiny model."""

from __future__ import annotations

import json
from dataclasses import replace

import grpc
import pytest
from e2e.served import Served, start_served
from test_response_format_wire import engine_info, model_info  # ModelInfo without a model

from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason, Usage
from treadle.api.params import ChatMessage, GenerationParams
from treadle.api.tools import TOOL_CHOICE_TYPES, Tool, ToolCall, ToolChoice
from treadle.client import AsyncClient, InvalidArgument, call_arguments, tool
from treadle.client.convert import (
    finish_from_proto,
    model_info_from_proto,
    request_to_proto,
    result_from_proto,
)
from treadle.client.errors import error_from_rpc
from treadle.scheduler.engine import EngineConfig
from treadle.scheduler.errors import ValidationError
from treadle.scheduler.events import FinishEvent
from treadle.scheduler.generation_request import GenerationRequest
from treadle.server.proto_convert import finish_to_proto, request_from_proto
from treadle.server.samples import SampleResults
from treadle.v1 import treadle_pb2 as pb
from treadle.worker.loader import LoadedModel

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}),
)
CLOCK = Tool("get_time")  # no description, no parameters
CALL = ToolCall("call_1", "get_weather", '{"city":"Paris"}')
HISTORY = [
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=(CALL,)),
    ChatMessage("tool", "sunny, 21 C", tool_call_id="call_1"),
]


def to_engine(
    tools: list[Tool], choice: ToolChoice | None, messages: list[ChatMessage] = HISTORY
) -> tuple[pb.GenerateRequest, GenerationRequest]:
    """The SDK's wire request for a chat, and the engine's view of it after the bytes."""
    msg = request_to_proto(messages, None, GenerationParams(), tools=tools, tool_choice=choice)
    wire = pb.GenerateRequest.FromString(msg.SerializeToString())
    return wire, request_from_proto(wire, RequestLimits())


# -- SDK -> wire -> engine ---------------------------------------------------------------
@pytest.mark.parametrize(
    "choice",
    [None, *map(ToolChoice, ("none", "auto", "required")), ToolChoice("function", "get_time")],
)
def test_tools_and_choice_travel_from_the_sdk_to_the_engine_unchanged(
    choice: ToolChoice | None,
) -> None:
    wire, gen = to_engine([WEATHER, CLOCK], choice)
    assert gen.tools == [WEATHER, CLOCK]
    assert gen.tool_choice == choice
    assert wire.chat.HasField("tool_choice") == (choice is not None)


def test_every_choice_type_has_a_wire_mode() -> None:
    modes = {pb.ToolChoice.Mode.Name(m) for m in pb.ToolChoice.Mode.values()}
    assert modes == {"MODE_UNSPECIFIED"} | {"MODE_" + t.upper() for t in TOOL_CHOICE_TYPES}


def test_the_wire_fields_hold_the_values() -> None:
    wire, _ = to_engine([WEATHER], ToolChoice("function", "get_weather"))
    (tool,) = wire.chat.tools
    assert (tool.name, tool.description, json.loads(tool.parameters)) == (
        "get_weather",
        "The weather in a city",
        {"type": "object", "properties": {"city": {"type": "string"}}},
    )
    assert wire.chat.tool_choice.mode == pb.ToolChoice.MODE_FUNCTION
    assert wire.chat.tool_choice.function == "get_weather"
    assistant, answer = wire.chat.messages[1], wire.chat.messages[2]
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}')
    ]
    assert (answer.role, answer.content, answer.tool_call_id) == ("tool", "sunny, 21 C", "call_1")


def test_history_calls_and_call_ids_reach_the_engine() -> None:
    _, gen = to_engine([WEATHER], None)
    assert gen.messages == HISTORY


def test_a_chat_without_tools_has_none_and_other_inputs_cannot_carry_them() -> None:
    gen = request_from_proto(pb.GenerateRequest(chat=pb.Chat(messages=[])), RequestLimits())
    assert (gen.tools, gen.tool_choice) == ([], None)
    prompt = request_from_proto(pb.GenerateRequest(prompt="hi"), RequestLimits())
    assert (prompt.tools, prompt.tool_choice) == ([], None)
    with pytest.raises(ValueError, match=r"chat.tools: is for a chat input"):
        request_to_proto("hi", None, GenerationParams(), tools=[WEATHER])
    with pytest.raises(ValueError, match=r"chat.tool_choice: is for a chat input"):
        request_to_proto(None, [1, 2], GenerationParams(), tool_choice=ToolChoice("none"))


def test_an_unspecified_mode_means_unset() -> None:
    chat = pb.Chat(tools=[pb.Tool(name="t")], tool_choice=pb.ToolChoice())
    gen = request_from_proto(pb.GenerateRequest(chat=chat), RequestLimits())
    assert gen.tool_choice is None  # the engine reads None as auto (there are tools)


# -- refusals in the conversion ------------------------------------------------------------
def refusal(chat: pb.Chat, limits: RequestLimits | None = None) -> ValidationError:
    with pytest.raises(ValidationError) as refused:
        request_from_proto(pb.GenerateRequest(chat=chat), limits or RequestLimits())
    return refused.value


def tools(*names: str, parameters: str = "") -> list[pb.Tool]:
    return [pb.Tool(name=n, parameters=parameters) for n in names]


def test_too_many_tools_are_refused_before_any_is_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    converted: list[object] = []
    monkeypatch.setattr("treadle.server.proto_convert.Tool", lambda *a: converted.append(a))
    error = refusal(pb.Chat(tools=tools("a", "b", "c")), RequestLimits(max_tools=2))
    assert (error.field, str(error)) == ("chat.tools", "chat.tools: at most 2 tools (got 3)")
    assert converted == []


@pytest.mark.parametrize(
    ("chat", "field", "message"),
    [
        (
            pb.Chat(tools=tools("a", parameters="x" * 40)),
            "chat.tools",
            "chat.tools: are 41 bytes in all (names, descriptions, parameters); the limit is 32",
        ),
        (
            pb.Chat(tools=tools("ok", "has space")),
            "chat.tools[1].name",
            "chat.tools[1].name: must be 1-64 characters of A-Z, a-z, 0-9, _ and -",
        ),
        (
            pb.Chat(tools=tools("a", "a")),
            "chat.tools[1].name",
            "chat.tools[1].name: 'a' is given twice",
        ),
        (
            pb.Chat(
                tools=tools("a"),
                tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_FUNCTION, function="b"),
            ),
            "chat.tool_choice",
            "chat.tool_choice: names 'b', which is not in chat.tools",
        ),
        (
            pb.Chat(tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)),
            "chat.tool_choice",
            "chat.tool_choice: required needs chat.tools",
        ),
        (
            pb.Chat(tools=tools("a"), tool_choice=pb.ToolChoice(function="a")),
            "chat.tool_choice",
            "chat.tool_choice: function is only for mode MODE_FUNCTION",
        ),
        (
            pb.Chat(tools=tools("a"), tool_choice=pb.ToolChoice(mode=9)),  # type: ignore[arg-type]  # newer
            "chat.tool_choice",
            "chat.tool_choice: unknown mode 9",
        ),
    ],
)
def test_bad_tools_or_choice_are_refused_naming_the_wire_field(
    chat: pb.Chat, field: str, message: str
) -> None:
    error = refusal(chat, RequestLimits(max_tools_bytes=32))
    assert (error.field, str(error)) == (field, message)


# -- FinishEvent -> wire -> SDK ------------------------------------------------------------
def finish_event(calls: tuple[ToolCall, ...], index: int = 0) -> FinishEvent:
    usage = Usage(5, 0, 9, 0.0, 0.01, 0.1)
    return FinishEvent("r", FinishReason.EOS, usage, index=index, tool_calls=calls)


def test_a_finish_carries_its_calls_to_the_sdk() -> None:
    second = ToolCall("call_2", "get_time", "{}")
    wire = finish_to_proto(finish_event((CALL, second)), 0)
    assert [(c.id, c.name, c.arguments) for c in wire.tool_calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}'),
        ("call_2", "get_time", "{}"),
    ]
    assert wire.reason == pb.FINISH_REASON_EOS  # calls made: still EOS
    sdk = finish_from_proto("r", pb.Finish.FromString(wire.SerializeToString()))
    assert sdk.tool_calls == (CALL, second)
    assert call_arguments(sdk.tool_calls[0]) == {"city": "Paris"}
    assert finish_from_proto("r", finish_to_proto(finish_event(()), 0)).tool_calls == ()


def test_a_unary_response_has_each_samples_calls() -> None:
    results = SampleResults(2)
    results.finish(0, finish_to_proto(finish_event((CALL,), 0), 0))
    results.finish(1, finish_to_proto(finish_event((), 1), 0))
    result = result_from_proto(results.response("r"))
    assert result.tool_calls == (CALL,)  # sample 0's, at the top
    assert [s.tool_calls for s in result.samples] == [(CALL,), ()]


def test_model_info_reports_the_tool_limits_and_an_old_server_reports_none() -> None:
    limits = replace(RequestLimits(), max_tools=7, max_tools_bytes=999)
    wire = model_info(engine_info(limits, ()))
    assert (wire.max_tools, wire.max_tools_bytes) == (7, 999)  # filled by name
    sdk = model_info_from_proto(wire)
    assert (sdk.max_tools, sdk.max_tools_bytes) == (7, 999)
    old = model_info_from_proto(pb.ModelInfoResponse())
    assert (old.max_tools, old.max_tools_bytes) == (0, 0)  # 0: no tool calling


# -- through a real server ---------------------------------------------------------------
CHAT = [pb.ChatMessage(role="user", content="Weather in Paris?")]


async def refused_field(served: Served, chat: pb.Chat) -> InvalidArgument:
    request = pb.GenerateRequest(chat=chat, stopping=pb.StoppingParameters(max_new_tokens=4))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.stub.Generate(request, timeout=60)
    error = error_from_rpc(refused.value)
    assert isinstance(error, InvalidArgument), error
    return error


async def test_the_server_refuses_bad_tools_naming_the_field(served: Served) -> None:
    over = pb.Chat(messages=CHAT, tools=tools(*(f"t{i}" for i in range(129))))
    duplicate = pb.Chat(messages=CHAT, tools=tools("a", "a"))
    unknown = pb.Chat(
        messages=CHAT,
        tools=tools("a"),
        tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_FUNCTION, function="zzz"),
    )
    errors = [await refused_field(served, chat) for chat in (over, duplicate, unknown)]
    assert [(e.field, str(e)) for e in errors] == [
        ("chat.tools", "chat.tools: at most 128 tools (got 129)"),
        ("chat.tools[1].name", "chat.tools[1].name: 'a' is given twice"),
        ("chat.tool_choice", "chat.tool_choice: names 'zzz', which is not in chat.tools"),
    ]


async def test_the_sdk_reads_the_servers_tool_limits(served: Served) -> None:
    async with AsyncClient(served.target, timeout=60) as client:
        info = await client.model_info()
        assert (info.max_tools, info.max_tools_bytes) == (128, 131072)
        with pytest.raises(InvalidArgument) as local:  # refused before sending
            await client.generate(
                [{"role": "user", "content": "hi"}], tools=[{"name": f"t{i}"} for i in range(129)]
            )
    assert local.value.code is None and local.value.field == "chat.tools"


async def test_a_function_choice_ends_with_one_call_of_that_tool(tiny: LoadedModel) -> None:
    """The tiny model writes nonsense: what it writes under the choice is what the
    constraint allowed, parsed back into the Finish. The whole context of the tiny
    model (512): the tools fill ~200 tokens of the prompt."""
    bounded = {  # bounded (no other keys either): a random model completes the call
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "Weather?"}]
    served = await start_served(tiny, EngineConfig(max_batch_rows=2, max_seq_len=512))
    try:
        async with AsyncClient(served.target, timeout=60) as client:
            result = await client.generate(
                messages, tools=[tool("get_weather", bounded)], tool_choice="get_weather"
            )
    finally:
        await served.stop()
    assert result.reason is FinishReason.EOS, result.text
    (call,) = result.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert call_arguments(call)["city"] in ("Paris", "Oslo")


async def test_tokenize_renders_the_tools_as_generate_does(served: Served) -> None:
    chat = [{"role": "user", "content": "Weather in Oslo?"}]
    weather = tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})
    async with AsyncClient(served.target, timeout=60) as client:
        plain = await client.tokenize(chat)
        with_tools = await client.tokenize(chat, tools=[weather])
    text = served.engine.inputs.tokenizer.decode(with_tools)
    assert len(with_tools) > len(plain) and '"name": "get_weather"' in text
