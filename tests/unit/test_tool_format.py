"""The Hermes tool-call format: the call grammar, parsing calls, splitting streamed text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from treadle.api.params import ResponseFormat
from treadle.api.tools import Tool, ToolChoice
from treadle.scheduler.tool_format import call_grammar, parse_calls, parse_tools
from treadle.scheduler.tool_splitter import ToolCallSplitter
from treadle.worker.grammar import GrammarCompiler

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = parse_tools([Tool("get_weather", "", json.dumps(CITY)), Tool("now")], 10_000)
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
NOW = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'


def accepts(
    compiler: GrammarCompiler, tokenizer: Any, choice: ToolChoice, text: str
) -> tuple[bool, bool]:
    """(whether the grammar of `choice` takes `text`, whether it may end there)."""
    lark = call_grammar(TOOLS, choice)
    assert lark is not None
    state = compiler.state(ResponseFormat("grammar", lark))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ok = all(state.matcher.consume_token(t) for t in ids)
    return ok, ok and bool(state.matcher.is_accepting())


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id], 10.0)


@pytest.mark.parametrize(
    ("choice", "text", "ok", "may_end"),
    [
        (ToolChoice("auto"), "Just text.", True, True),
        (ToolChoice("auto"), f"Let me look. {WEATHER}\n{NOW}", True, True),
        (ToolChoice("auto"), "Let me look. <tool_call> hello", False, False),  # a call, once begun
        (ToolChoice("auto"), '<tool_call>{"name": "get_weather", "arguments": {}}', False, False),
        (ToolChoice("required"), "Just text.", False, False),
        (ToolChoice("required"), f"{NOW}\n{WEATHER}", True, True),
        (ToolChoice("required"), '<tool_call>{"name": "get_weather"', True, False),
        (ToolChoice("function", "now"), NOW, True, True),
        (ToolChoice("function", "now"), WEATHER, False, False),
        (ToolChoice("function", "now"), f"{NOW}{NOW}", False, False),  # exactly one call
    ],
)
def test_the_call_grammar(
    compiler: GrammarCompiler,
    tokenizer: Any,
    choice: ToolChoice,
    text: str,
    ok: bool,
    may_end: bool,
) -> None:
    assert accepts(compiler, tokenizer, choice, text) == (ok, may_end)


def test_none_is_unconstrained() -> None:
    assert call_grammar(TOOLS, ToolChoice("none")) is None


def test_parse_calls() -> None:
    calls, end = parse_calls(f"{WEATHER}\n\n{NOW}\n")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("now", {}),
    ]
    assert end == len(WEATHER) + len(NOW) + 3
    calls, end = parse_calls(f"{WEATHER}\n{NOW[:-3]}")  # the second call cut short
    assert [c.name for c in calls] == ["get_weather"] and end == len(WEATHER) + 1
    for bad in (
        WEATHER[:-3],  # cut inside the closing marker
        '<tool_call>{"name": "x"}</tool_call>',  # no arguments
        '<tool_call>{"name": "x", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "x", "arguments": {}, "extra": 1}</tool_call>',
        "<tool_call>" + "[" * 100_000,
        "",
    ):
        assert parse_calls(bad) == ((), 0), bad


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_the_splitter_releases_content_and_keeps_calls(size: int) -> None:
    output = f"I'll check <tool the <tool_ weather. {WEATHER}\n{NOW}"
    splitter = ToolCallSplitter()
    released = "".join(splitter.feed(output[i : i + size]) for i in range(0, len(output), size))
    rest, calls = splitter.finish()
    assert released == "I'll check <tool the <tool_ weather. " and rest == ""
    assert [c.name for c in calls] == ["get_weather", "now"]


def test_the_splitter_releases_what_does_not_parse_and_a_held_prefix() -> None:
    splitter = ToolCallSplitter()
    assert splitter.feed('Text <tool_call>{"name": ') == "Text "
    assert splitter.finish() == ('<tool_call>{"name": ', ())
    splitter = ToolCallSplitter()
    assert splitter.feed("Text <tool_c") == "Text "
    assert splitter.finish() == ("<tool_c", ())
