"""response_format over the wire: a real grpc.aio server on a tiny random model.

A random model writes nonsense, so whatever it writes under a format is what the
format allowed: JSON that validates against its schema, one of the choices, a
regex's full match. A format the server cannot use is refused with
INVALID_ARGUMENT naming `response_format` before anything is queued (no step runs).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from e2e.served import Served, start_served

from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason
from treadle.api.params import RESPONSE_FORMAT_TYPES
from treadle.client import AsyncClient, InvalidArgument, choice, json_schema, regex
from treadle.scheduler.engine import EngineConfig
from treadle.scheduler.step_stats import StepStats
from treadle.v1 import treadle_pb2 as pb
from treadle.worker.loader import LoadedModel

PROMPT = [101, 2045, 3310, 77, 19]
BOUND = 60  # seconds any call here may take
SCHEMA: dict[str, Any] = {  # bounded, so a random model completes it well within the budget
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["a", "b", "c"]},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}


async def test_model_info_reports_the_formats_and_their_limits(served: Served) -> None:
    info = await served.stub.ModelInfo(pb.ModelInfoRequest())
    assert tuple(info.response_format_types) == RESPONSE_FORMAT_TYPES
    limits = RequestLimits()
    assert info.max_response_format_bytes == limits.max_response_format_bytes
    assert info.max_response_format_choices == limits.max_response_format_choices
    assert info.response_format_compile_seconds == limits.response_format_compile_seconds


async def test_a_json_schema_answer_is_json_valid_against_the_schema(served: Served) -> None:
    async with AsyncClient(served.target, timeout=BOUND) as client:
        await client.model_info()  # the SDK now checks against the server's limits too
        result = await client.generate(
            token_ids=PROMPT, response_format=json_schema(SCHEMA), max_new_tokens=64
        )
        sampled = await client.generate(
            token_ids=PROMPT,
            response_format=json_schema(SCHEMA),
            max_new_tokens=64,
            temperature=1.0,
            seed=5,
        )
    for answer in (result, sampled):
        assert answer.reason is FinishReason.EOS, answer.text  # the format was complete
        jsonschema.validate(json.loads(answer.text), SCHEMA)


async def test_a_choice_answer_is_one_of_the_choices(served: Served) -> None:
    options = ["red", "green", "blue"]
    async with AsyncClient(served.target, timeout=BOUND) as client:
        results = [
            await client.generate(
                token_ids=PROMPT, response_format=choice(options), temperature=1.0, seed=seed
            )
            for seed in range(3)
        ]
    for result in results:
        assert result.text in options and result.reason is FinishReason.EOS


async def test_a_regex_answer_matches_whole(served: Served) -> None:
    pattern = r"(yes|no) [0-9]{1,3}"
    async with AsyncClient(served.target, timeout=BOUND) as client:
        result = await client.generate(
            token_ids=PROMPT, response_format=regex(pattern), max_new_tokens=32
        )
        streamed = await client.stream(
            token_ids=PROMPT, response_format=regex(pattern), max_new_tokens=32
        ).result()
    assert re.fullmatch(pattern, result.text) and result.reason is FinishReason.EOS
    assert streamed.text == result.text  # greedy: the stream writes the same answer


async def test_a_cut_answer_ends_with_length(served: Served) -> None:
    async with AsyncClient(served.target, timeout=BOUND) as client:
        result = await client.generate(
            token_ids=PROMPT, response_format=json_schema(SCHEMA), max_new_tokens=3
        )
    assert result.reason is FinishReason.LENGTH and len(result.token_ids) == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)  # three tokens cannot close this object


@asynccontextmanager
async def no_steps(served: Served) -> AsyncIterator[None]:
    """Fails unless the engine ran no step in the block (nothing was queued)."""
    steps: list[StepStats] = []
    served.engine.step_observers.append(steps.append)
    try:
        yield
    finally:
        served.engine.step_observers.remove(steps.append)
    assert steps == [] and served.engine.num_in_flight == 0


def raw(fmt: pb.ResponseFormat, **stopping: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT),
        stopping=pb.StoppingParameters(max_new_tokens=8, **stopping),
        response_format=fmt,
    )


async def refusal(served: Served, request: pb.GenerateRequest) -> str:
    """The details of an INVALID_ARGUMENT refusal of `request`, by Generate and by
    GenerateStream alike."""
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await served.stub.Generate(request, timeout=BOUND)
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for _ in served.stub.GenerateStream(request, timeout=BOUND):
            pass
    for refused in (unary.value, stream.value):
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert unary.value.details() == stream.value.details()
    return str(unary.value.details())


@pytest.mark.parametrize(
    ("fmt", "stopping"),
    [
        (pb.ResponseFormat(json_schema="{not json"), {}),
        (pb.ResponseFormat(json_schema='{"type": "no such type"}'), {}),
        (pb.ResponseFormat(regex="(unclosed"), {}),
        (pb.ResponseFormat(grammar="start: undefined_rule"), {}),
        (pb.ResponseFormat(regex=""), {}),
        (pb.ResponseFormat(choice=pb.ResponseFormat.Choice()), {}),
        (pb.ResponseFormat(), {}),  # no kind set
        (pb.ResponseFormat(json_object=pb.ResponseFormat.JsonObject()), {"ignore_eos": True}),
    ],
)
async def test_a_format_the_server_cannot_use_is_refused_before_it_is_queued(
    served: Served, fmt: pb.ResponseFormat, stopping: dict[str, Any]
) -> None:
    async with no_steps(served):
        details = await refusal(served, raw(fmt, **stopping))
    assert details.startswith("response_format: ")


async def test_a_format_over_the_limits_is_refused_naming_the_field(tiny: LoadedModel) -> None:
    limits = RequestLimits(max_response_format_bytes=64, max_response_format_choices=3)
    s = await start_served(tiny, EngineConfig(max_batch_rows=4, max_seq_len=256, limits=limits))
    try:
        info = await s.stub.ModelInfo(pb.ModelInfoRequest())
        assert (info.max_response_format_bytes, info.max_response_format_choices) == (64, 3)
        big = json.dumps({"type": "string", "description": "x" * 100})
        four = pb.ResponseFormat.Choice(choices=["a", "b", "c", "d"])
        async with no_steps(s):
            assert await refusal(s, raw(pb.ResponseFormat(json_schema=big))) == (
                f"response_format: is {len(big)} bytes; the limit is 64"
            )
            assert await refusal(s, raw(pb.ResponseFormat(choice=four))) == (
                "response_format: at most 3 choices (got 4)"
            )
        async with AsyncClient(s.target, timeout=BOUND) as client:
            with pytest.raises(InvalidArgument) as refused:  # the server's refusal, typed
                await client.generate(
                    token_ids=PROMPT, response_format=choice(["a", "b", "c", "d"])
                )
            assert refused.value.field == "response_format"
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            await client.model_info()
            with pytest.raises(InvalidArgument) as local:  # now checked before sending
                await client.generate(
                    token_ids=PROMPT, response_format=json_schema(json.loads(big))
                )
            assert local.value.field == "response_format" and local.value.code is None
            three = await client.generate(token_ids=PROMPT, response_format=choice(["a", "b", "c"]))
            assert three.text in ("a", "b", "c")  # at the limits: served
    finally:
        await s.stop()


async def test_the_cli_writes_json_valid_against_a_schema_file(
    served: Served, tmp_path: Path
) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    argv = ["generate", "Hello", "--target", served.target, "--max-new-tokens", "64"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "treadle.client.cli",
        *argv,
        "--json-schema",
        str(schema_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode == 0, err.decode()
    jsonschema.validate(json.loads(out.decode()), SCHEMA)
    assert "[eos]" in err.decode()
