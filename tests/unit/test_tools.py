"""Tool calls in the engine, on a tiny random llama with SmolLM2's tokenizer.

A random model writes nonsense, so every call here is what the call grammar
allowed: with tool_choice required or a named function the output is calls
whose arguments validate against their tool's schema, and the streamed text
holds nothing of them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import jsonschema
import pytest
from helpers import drive, run_checked

from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason
from treadle.api.params import ChatMessage, ResponseFormat
from treadle.api.tools import Tool, ToolCall, ToolChoice
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.errors import ValidationError
from treadle.scheduler.generation_request import GenerationRequest
from treadle.scheduler.tool_format import OPEN
from treadle.worker.loader import LoadedModel

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    Tool("get_weather", "The weather in a city", json.dumps(WEATHER)),
    Tool("now", "The current time"),
]
SCHEMAS = {"get_weather": WEATHER, "now": {"type": "object", "maxProperties": 0}}
CHAT = [ChatMessage("user", "What is the weather in Paris?")]


def engine_for(tiny: LoadedModel, **config: Any) -> Engine:
    settings = {"max_batch_rows": 8, "max_seq_len": 1024, "block_size": 16, **config}
    return Engine(tiny, EngineConfig(**settings))


def chat(rid: str, choice: ToolChoice | None, **params: Any) -> GenerationRequest:
    settings: dict[str, Any] = {"max_new_tokens": 120, "messages": CHAT, "tools": TOOLS, **params}
    return GenerationRequest(request_id=rid, tool_choice=choice, **settings)


def assert_valid(calls: tuple[ToolCall, ...]) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert len({c.id for c in calls}) == len(calls)


def test_required_and_named_choices_make_valid_calls_and_stream_no_markup(
    tiny: LoadedModel,
) -> None:
    engine = engine_for(tiny)
    gens = [
        chat("named", ToolChoice("function", "get_weather")),
        chat("required", ToolChoice("required")),
        chat("sampled", ToolChoice("required"), temperature=1.0, seed=3),
        chat("two", ToolChoice("function", "now"), n=2, temperature=1.0, seed=5),
    ]
    got, _ = run_checked(engine, gens)
    named = got["named"]
    assert named.finish.reason is FinishReason.EOS
    assert [c.name for c in named.finish.tool_calls] == ["get_weather"]
    assert_valid(named.finish.tool_calls)
    assert named.text == ""  # the call is in the finish, not in the text
    for rid in ("required", "sampled"):
        if got[rid].finish.reason is FinishReason.EOS:
            assert_valid(got[rid].finish.tool_calls)
            assert got[rid].text == ""
    for s in range(2):
        sample = got["two"].sample(s)
        assert [c.name for c in sample.finish.tool_calls] == ["now"]
        assert sample.finish.tool_calls[0].arguments == "{}"


def test_auto_text_never_holds_a_call_and_calls_are_valid(tiny: LoadedModel) -> None:
    """Whatever the random model writes under auto, the marker never reaches the text, and
    any call it made validates (one sampled row per seed)."""
    engine = engine_for(tiny)
    gens = [chat(f"s{i}", None, temperature=1.0, seed=i, max_new_tokens=40) for i in range(6)]
    got, _ = run_checked(engine, gens)
    for c in got.values():
        assert OPEN not in c.text
        if c.finish.tool_calls:
            assert_valid(c.finish.tool_calls)


def test_a_call_cut_by_length_is_released_as_text(tiny: LoadedModel) -> None:
    engine = engine_for(tiny)
    got, _ = run_checked(
        engine, [chat("cut", ToolChoice("function", "get_weather"), max_new_tokens=6)]
    )
    cut = got["cut"]
    assert cut.finish.reason is FinishReason.LENGTH
    assert cut.finish.tool_calls == ()
    assert cut.text.lstrip().startswith(OPEN)  # nothing lost: the partial call is text


def test_tool_rows_leave_plain_rows_untouched(tiny: LoadedModel) -> None:
    def plain(i: int) -> GenerationRequest:
        return GenerationRequest(
            request_id=f"p{i}", messages=CHAT, max_new_tokens=16, ignore_eos=True
        )

    alone = drive(engine_for(tiny), [(0, plain(i)) for i in range(2)])
    mixed = [plain(0), chat("t", ToolChoice("required")), plain(1), chat("a", None)]
    together = drive(engine_for(tiny), [(i % 2, g) for i, g in enumerate(mixed)])
    for i in range(2):
        assert together[f"p{i}"].tokens == alone[f"p{i}"].tokens


def rendered(engine: Engine, gen: GenerationRequest) -> str:
    ids, _ = engine.tokenize(gen)
    return str(engine.inputs.tokenizer.decode(ids))


HISTORY = [
    *CHAT,
    ChatMessage(
        "assistant",
        "",
        tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),),
    ),
    ChatMessage("tool", '{"temperature": 21}', tool_call_id="call_1"),
]


def test_a_template_without_tools_gets_the_generic_format(tiny: LoadedModel) -> None:
    engine = engine_for(tiny)
    text = rendered(engine, chat("r", None, messages=HISTORY))
    assert text.startswith("<|im_start|>system\n# Tools")
    assert '{"type": "function", "function": {"name": "get_weather"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ' in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")
    # without tools and calls a chat renders as before
    before = rendered(engine, GenerationRequest(messages=CHAT))
    assert "# Tools" not in before and "You are a helpful AI assistant" in before


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]"
    "{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}|{% endfor %}"
)


def test_a_template_with_tools_renders_them_itself(tiny: LoadedModel) -> None:
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    engine = engine_for(dataclasses.replace(tiny, tokenizer=tokenizer))
    assert engine.inputs.template_takes_tools
    text = rendered(engine, chat("r", None, messages=HISTORY))
    assert text.startswith("TOOLS:get_weather;now;|")
    assert "|assistant:[get_weather Paris]|" in text  # arguments given to it as an object
    assert '|tool:{"temperature": 21}(call_1)|' in text


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ({"messages": None, "prompt": "hi"}, "chat.tools", "need a chat input"),
        ({"tools": [Tool("a b")]}, "chat.tools[0].name", "A-Z"),
        ({"tools": [Tool("f", parameters="[1]")]}, "chat.tools[0].parameters", "JSON object"),
        ({"tools": [Tool("f", parameters="{")]}, "chat.tools[0].parameters", "not JSON"),
        ({"tools": [Tool("f"), Tool("f")]}, "chat.tools[1].name", "given twice"),
        ({"tools": [Tool(f"t{i}") for i in range(129)]}, "chat.tools", "at most 128 tools"),
        ({"tool_choice": ToolChoice("function", "nope")}, "chat.tool_choice", "not in"),
        ({"tool_choice": ToolChoice("maybe")}, "chat.tool_choice", "not one of"),
        ({"tools": [], "tool_choice": ToolChoice("required")}, "chat.tool_choice", "needs"),
        (
            {"response_format": ResponseFormat("json_object")},
            "response_format",
            "cannot be combined with tools",
        ),
        ({"ignore_eos": True}, "chat.tool_choice", "ignore_eos"),
        (
            {"messages": [ChatMessage("user", "x", tool_calls=(ToolCall("1", "f", "{}"),))]},
            "chat.messages[0].tool_calls",
            "only an assistant",
        ),
        (
            {"messages": [ChatMessage("assistant", "", tool_calls=(ToolCall("1", "f", "[]"),))]},
            "chat.messages[0].tool_calls[0].arguments",
            "JSON object",
        ),
        (
            {"tools": [Tool("f", parameters='{"type": "frobnicate"}')]},
            "chat.tools",
            "frobnicate",
        ),
    ],
)
def test_bad_tools_are_refused_before_queueing(
    tiny: LoadedModel, change: dict[str, Any], field: str, why: str
) -> None:
    engine = engine_for(tiny)
    gen = chat("bad", None)
    for name, value in change.items():
        setattr(gen, name, value)
    with pytest.raises(ValidationError, match=why) as info:
        engine.factory.build(gen, "bad", lambda events: None)
    assert info.value.field == field


def test_tool_bytes_are_limited(tiny: LoadedModel) -> None:
    engine = engine_for(tiny, limits=RequestLimits(max_tools_bytes=100))
    gen = chat("big", None, tools=[Tool("f", "x" * 200)])
    with pytest.raises(ValidationError, match=r"chat.tools: are 201 bytes .* the limit is 100"):
        engine.factory.build(gen, "big", lambda events: None)


def test_tool_choice_none_leaves_the_output_free(tiny: LoadedModel) -> None:
    engine = engine_for(tiny)
    req = engine.factory.build(chat("n", ToolChoice("none")), "n", lambda events: None)
    assert req.grammar is None and req.calls is None
    auto = engine.factory.build(chat("a", None), "a", lambda events: None)
    assert auto.grammar is not None and auto.calls is not None
