"""Tool calls on the real SmolLM2-135M-Instruct, through a real gRPC server and the SDK.

SmolLM2's chat template has no tool support, so the tools reach it in treadle's
generic format (docs/tools.md). A named function or `required` makes the output
a valid call whatever the model would have written; the conversation then goes
on with the call's result.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from e2e.served import Served, start_served

from treadle.api.outcome import FinishReason
from treadle.client import AsyncClient, call_arguments, tool
from treadle.scheduler.engine import EngineConfig
from treadle.worker.loader import LoadedModel

pytestmark = pytest.mark.integration

BOUND = 120  # seconds any call here may take
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    tool("get_weather", WEATHER, "The current weather in a city"),
    tool("get_time", {"type": "object", "properties": {}, "additionalProperties": False}),
]
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture
async def served(smol: LoadedModel) -> AsyncIterator[Served]:
    s = await start_served(smol, EngineConfig(max_batch_rows=4, max_seq_len=1024))
    yield s
    await s.stop()


async def test_a_named_function_is_called_with_valid_arguments(served: Served) -> None:
    async with AsyncClient(served.target, timeout=BOUND) as client:
        result = await client.generate(
            QUESTION, tools=TOOLS, tool_choice="get_weather", max_new_tokens=60
        )
    assert result.reason is FinishReason.EOS and result.text == ""
    (call,) = result.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    arguments = call_arguments(call)
    jsonschema.validate(arguments, WEATHER)
    assert "Paris" in arguments["city"]  # the model read the question


async def test_auto_and_required_and_the_answer_after_a_call(served: Served) -> None:
    async with AsyncClient(served.target, timeout=BOUND) as client:
        auto = await client.generate(QUESTION, tools=TOOLS, max_new_tokens=80)
        required = await client.generate(
            QUESTION, tools=TOOLS, tool_choice="required", max_new_tokens=80
        )
        assert "<tool_call>" not in auto.text
        for call in auto.tool_calls:  # if it chose to call, the call is valid
            assert call.name in ("get_weather", "get_time")
            call_arguments(call)
        # SmolLM2-135M repeats its call until the length limit: the complete ones count
        assert required.tool_calls and "get_weather" in required.tool_calls[0].name
        assert required.text == "" or required.text.startswith("<tool_call>")
        call = required.tool_calls[0]
        jsonschema.validate(call_arguments(call), WEATHER)
        history = [
            *QUESTION,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {
                "role": "tool",
                "tool_call_id": call.id,
                "content": json.dumps({"temperature": 21, "unit": "celsius", "sky": "sunny"}),
            },
        ]
        answer = await client.generate(history, tools=TOOLS, tool_choice="none", max_new_tokens=60)
    assert answer.reason in (FinishReason.EOS, FinishReason.LENGTH)
    assert answer.text.strip() and not answer.tool_calls
