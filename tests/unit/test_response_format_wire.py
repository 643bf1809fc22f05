"""response_format at the edge, without a model: each kind from the SDK over the wire to
the engine's ResponseFormat, an unset field, an empty oneof, and the limits and accepted
types ModelInfo reports (through the real servicer) and the SDK reads back."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from treadle.api.limits import RequestLimits
from treadle.api.params import RESPONSE_FORMAT_TYPES, GenerationParams, ResponseFormat
from treadle.client.convert import model_info_from_proto, request_to_proto
from treadle.scheduler.engine_info import EngineInfo
from treadle.scheduler.errors import ValidationError
from treadle.server.metrics import ServerMetrics
from treadle.server.proto_convert import request_from_proto, response_format_from_proto
from treadle.server.service import GenerationService
from treadle.v1 import treadle_pb2 as pb

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
FORMATS = {
    "json_schema": ResponseFormat("json_schema", value=SCHEMA),
    "json_object": ResponseFormat("json_object"),
    "regex": ResponseFormat("regex", value=r"(yes|no) [0-9]{1,3}"),
    "grammar": ResponseFormat("grammar", value='start: "x" ("," "x")*'),
    "choice": ResponseFormat("choice", choices=("red", "green", "blue", "")),  # "" too: the
    # wire carries what it is given, the engine refuses an empty choice
}


def test_every_type_has_a_case_here() -> None:
    assert tuple(FORMATS) == RESPONSE_FORMAT_TYPES


@pytest.mark.parametrize("kind", RESPONSE_FORMAT_TYPES)
def test_each_kind_travels_from_the_sdk_to_the_engine_unchanged(kind: str) -> None:
    fmt = FORMATS[kind]
    msg = request_to_proto("hi", None, GenerationParams(response_format=fmt))
    assert msg.HasField("response_format")
    assert msg.response_format.WhichOneof("format") == kind  # the oneof names the type
    wire = pb.GenerateRequest.FromString(msg.SerializeToString())  # through the bytes
    gen = request_from_proto(wire, RequestLimits())
    assert gen.response_format == fmt


def test_the_wire_fields_hold_the_values() -> None:
    def wire(kind: str) -> pb.ResponseFormat:
        params = GenerationParams(response_format=FORMATS[kind])
        return request_to_proto("hi", None, params).response_format

    assert wire("json_schema").json_schema == SCHEMA
    assert wire("regex").regex == r"(yes|no) [0-9]{1,3}"
    assert wire("grammar").grammar == 'start: "x" ("," "x")*'
    assert list(wire("choice").choice.choices) == ["red", "green", "blue", ""]
    assert wire("json_object").HasField("json_object")


def test_a_message_from_another_client_converts() -> None:
    msg = pb.GenerateRequest(
        prompt="hi",
        response_format=pb.ResponseFormat(choice=pb.ResponseFormat.Choice(choices=["a", "b"])),
    )
    assert request_from_proto(msg, RequestLimits()).response_format == ResponseFormat(
        "choice", choices=("a", "b")
    )
    empty_schema = pb.GenerateRequest(prompt="hi", response_format=pb.ResponseFormat(regex=""))
    # set, though empty: the engine's check refuses it ("regex needs a value"), not dropped
    assert response_format_from_proto(empty_schema) == ResponseFormat("regex", value="")


def test_an_unset_field_is_unconstrained() -> None:
    assert request_from_proto(pb.GenerateRequest(prompt="hi"), RequestLimits()).response_format is (
        None
    )
    assert not request_to_proto("hi", None, GenerationParams()).HasField("response_format")


def test_a_format_with_no_kind_set_is_refused_naming_the_field() -> None:
    msg = pb.GenerateRequest(prompt="hi")
    msg.response_format.SetInParent()  # present but empty (e.g. a kind newer than the server)
    with pytest.raises(ValidationError) as refused:
        request_from_proto(msg, RequestLimits())
    assert refused.value.field == "response_format"
    assert str(refused.value) == (
        "response_format: must set one of json_schema, json_object, regex, grammar, choice"
    )


def test_an_unknown_sdk_type_is_not_sent() -> None:
    params = GenerationParams(response_format=ResponseFormat("yaml", value="a: 1"))
    with pytest.raises(ValueError, match="unknown type 'yaml'"):
        request_to_proto("hi", None, params)


# -- ModelInfo ---------------------------------------------------------------------------
def engine_info(limits: RequestLimits, types: tuple[str, ...]) -> EngineInfo:
    return EngineInfo(
        model="m",
        context_length=512,
        max_total_tokens=512,
        vocab_size=100,
        eos_token_ids=(2,),
        max_batch_rows=4,
        kv_cache_tokens=1024,
        block_size=16,
        max_waiting=8,
        max_prompt_chars=1000,
        plugins=(),
        has_chat_template=False,
        accepts_images=False,
        response_format_types=types,
        limits=limits,
    )


def model_info(info: EngineInfo) -> pb.ModelInfoResponse:
    """The servicer's ModelInfo answer for an engine with `info` (nothing else is read)."""
    service = GenerationService(ServerMetrics("m"), max_request_bytes=1 << 20)
    service.engine = SimpleNamespace(info=info, accepting=True)  # type: ignore[assignment]
    return asyncio.run(service.ModelInfo(pb.ModelInfoRequest(), context=None))


def test_model_info_reports_the_limits_and_the_accepted_types() -> None:
    limits = replace(
        RequestLimits(),
        max_response_format_bytes=4096,
        max_response_format_choices=12,
        response_format_compile_seconds=2.5,
    )
    wire = model_info(engine_info(limits, RESPONSE_FORMAT_TYPES))
    assert (
        wire.max_response_format_bytes,
        wire.max_response_format_choices,
        wire.response_format_compile_seconds,
        tuple(wire.response_format_types),
    ) == (4096, 12, 2.5, RESPONSE_FORMAT_TYPES)
    sdk = model_info_from_proto(wire)
    assert (
        sdk.max_response_format_bytes,
        sdk.max_response_format_choices,
        sdk.response_format_compile_seconds,
        sdk.response_format_types,
    ) == (4096, 12, 2.5, RESPONSE_FORMAT_TYPES)


def test_a_server_without_structured_output_reports_no_types() -> None:
    wire = model_info(engine_info(RequestLimits(), ()))
    assert list(wire.response_format_types) == []
    assert wire.max_response_format_bytes == RequestLimits().max_response_format_bytes
    assert model_info_from_proto(wire).response_format_types == ()


def test_an_older_server_means_default_limits_and_no_types() -> None:
    old = model_info_from_proto(pb.ModelInfoResponse())  # every new field 0 / empty
    defaults = RequestLimits()
    assert old.max_response_format_bytes == defaults.max_response_format_bytes
    assert old.max_response_format_choices == defaults.max_response_format_choices
    assert old.response_format_compile_seconds == defaults.response_format_compile_seconds
    assert old.response_format_types == ()
