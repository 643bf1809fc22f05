"""The SDK's response_format, without a server: the helpers (a dict, a pydantic model
class), the wire message they make, the checks made before sending (shape, the server's
limits, the types it accepts) and the CLI flags."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from treadle.api.limits import RequestLimits
from treadle.api.params import ResponseFormat
from treadle.client import (
    AsyncClient,
    InvalidArgument,
    choice,
    grammar,
    json_object,
    json_schema,
    regex,
)
from treadle.client.cli import params_from_args, parse
from treadle.client.convert import request_to_proto
from treadle.v1 import treadle_pb2 as pb

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


class Person(pydantic.BaseModel):
    name: str
    age: int


# -- the helpers -------------------------------------------------------------------------
def test_json_schema_of_a_dict_is_compact_json_in_key_order() -> None:
    fmt = json_schema(SCHEMA)
    assert fmt == ResponseFormat("json_schema", value=json.dumps(SCHEMA, separators=(",", ":")))
    assert json.loads(fmt.value) == SCHEMA
    assert fmt.value.index('"name"') < fmt.value.index('"age"')  # properties keep their order


def test_json_schema_of_a_pydantic_model_class_is_its_schema() -> None:
    fmt = json_schema(Person)
    assert fmt.type == "json_schema"
    assert json.loads(fmt.value) == Person.model_json_schema()
    assert json.loads(fmt.value)["required"] == ["name", "age"]


def test_json_schema_refuses_what_is_not_a_schema() -> None:
    with pytest.raises(TypeError, match="not list"):
        json_schema([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not str"):
        json_schema('{"type": "object"}')  # type: ignore[arg-type]


def test_the_other_helpers() -> None:
    assert json_object() == ResponseFormat("json_object")
    assert regex("[0-9]+") == ResponseFormat("regex", value="[0-9]+")
    assert grammar('start: "a"+') == ResponseFormat("grammar", value='start: "a"+')
    assert choice(["yes", "no"]) == ResponseFormat("choice", choices=("yes", "no"))
    assert choice(c for c in ("a", "b")).choices == ("a", "b")  # any iterable


def test_choice_refuses_one_string_and_non_strings() -> None:
    with pytest.raises(TypeError, match="not one string"):
        choice("yes")
    with pytest.raises(TypeError, match="must be strings"):
        choice(["yes", 1])  # type: ignore[list-item]


# -- the request the client sends --------------------------------------------------------
async def test_a_helper_given_as_a_keyword_is_on_the_wire() -> None:
    async with AsyncClient() as client:  # nothing is sent: build_request only
        msg = client.build_request("hi", None, None, "", {"response_format": json_schema(Person)})
        assert json.loads(msg.response_format.json_schema) == Person.model_json_schema()
        msg = client.build_request("hi", None, None, "", {"response_format": choice(["a", "b"])})
        assert list(msg.response_format.choice.choices) == ["a", "b"]
        msg = client.build_request("hi", None, None, "", {"response_format": json_object()})
        assert msg.response_format.WhichOneof("format") == "json_object"


@pytest.mark.parametrize(
    ("fmt", "extra", "message"),
    [
        (regex(""), {}, "response_format: regex needs a value"),
        (choice([]), {}, "response_format: choice needs non-empty choices"),
        (choice(["a", ""]), {}, "response_format: choice needs non-empty choices"),
        (ResponseFormat("yaml", "a: 1"), {}, "response_format: type 'yaml' is not one of"),
        (
            json_object(),
            {"ignore_eos": True},
            "response_format: cannot be combined with ignore_eos",
        ),
        (regex("x" * 65), {}, "response_format: is 65 bytes; the limit is 64"),
        (
            choice(["a", "b", "c", "d"]),
            {},
            "response_format: at most 3 choices (got 4)",
        ),
    ],
)
async def test_a_bad_format_is_refused_before_sending_naming_the_field(
    fmt: ResponseFormat, extra: dict[str, Any], message: str
) -> None:
    limits = RequestLimits(max_response_format_bytes=64, max_response_format_choices=3)
    async with AsyncClient(limits=limits) as client:
        with pytest.raises(InvalidArgument) as refused:
            client.build_request("hi", None, None, "", {"response_format": fmt, **extra})
    assert refused.value.field == "response_format" and refused.value.code is None
    assert str(refused.value).startswith(message)


def model_info_answer(**fields: Any) -> pb.ModelInfoResponse:
    base: dict[str, Any] = {"model": "m", "max_samples": 4, "max_stop_strings": 16}
    return pb.ModelInfoResponse(**{**base, **fields})


async def ask_model_info(client: AsyncClient, answer: pb.ModelInfoResponse) -> None:
    """client.model_info() with `answer` as the server's reply (no channel is used)."""

    async def unary(method: Any, request: Any, timeout: Any) -> Any:
        assert isinstance(request, pb.ModelInfoRequest)
        return answer

    client._unary = unary  # type: ignore[method-assign]
    await client.model_info()


async def test_model_info_brings_the_servers_limits_and_types_into_the_checks() -> None:
    answer = model_info_answer(
        max_response_format_bytes=16,
        max_response_format_choices=2,
        response_format_compile_seconds=3.0,
        response_format_types=["regex", "choice"],
    )
    async with AsyncClient() as client:
        client.build_request("hi", None, None, "", {"response_format": regex("x" * 100)})
        client.build_request("hi", None, None, "", {"response_format": json_object()})
        await ask_model_info(client, answer)
        assert client.limits is not None
        assert (
            client.limits.max_response_format_bytes,
            client.limits.max_response_format_choices,
        ) == (16, 2)
        assert client.limits.response_format_compile_seconds == 3.0
        refusals = {
            "regex": regex("x" * 17),
            "choice": choice(["a", "b", "c"]),
            "type": json_object(),
        }
        messages = {}
        for name, fmt in refusals.items():
            with pytest.raises(InvalidArgument) as refused:
                client.build_request("hi", None, None, "", {"response_format": fmt})
            assert refused.value.field == "response_format"
            messages[name] = str(refused.value)
        client.build_request("hi", None, None, "", {"response_format": regex("x" * 16)})
    assert messages == {
        "regex": "response_format: is 17 bytes; the limit is 16",
        "choice": "response_format: at most 2 choices (got 3)",
        "type": "response_format: this server accepts regex, choice, not json_object",
    }


async def test_a_server_without_structured_output_refuses_every_format_locally() -> None:
    async with AsyncClient() as client:
        await ask_model_info(client, model_info_answer())  # an older server: no types
        with pytest.raises(InvalidArgument, match="this server has no structured output"):
            client.build_request("hi", None, None, "", {"response_format": choice(["a"])})
        client.build_request("hi", None, None, "", {})  # unconstrained requests still go


# -- the CLI -----------------------------------------------------------------------------
def cli_format(*argv: str) -> pb.ResponseFormat | None:
    """The wire response_format of `treadle generate hi ARGV...`, None when unset."""
    args = parse(["generate", "hi", *argv])
    msg = request_to_proto("hi", None, params_from_args(args))
    return msg.response_format if msg.HasField("response_format") else None


def test_each_cli_flag_makes_its_format(tmp_path: Path) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA, indent=2))
    grammar_file = tmp_path / "g.lark"
    grammar_file.write_text('start: "a"+\n')
    got = cli_format("--json-schema", str(schema_file))
    assert got is not None and json.loads(got.json_schema) == SCHEMA
    got = cli_format("--json-object")
    assert got is not None and got.WhichOneof("format") == "json_object"
    got = cli_format("--regex", "[0-9]{3}")
    assert got is not None and got.regex == "[0-9]{3}"
    got = cli_format("--choice", "yes", "--choice", "no")
    assert got is not None and list(got.choice.choices) == ["yes", "no"]
    got = cli_format("--grammar", str(grammar_file))
    assert got is not None and got.grammar == 'start: "a"+\n'
    assert cli_format() is None
    assert cli_format("--json") is None  # --json is still the output flag
    assert parse(["generate", "hi", "--json"]).json is True


def test_chat_takes_the_flags_too() -> None:
    args = parse(["chat", "--choice", "yes", "--choice", "no"])
    assert params_from_args(args).response_format == choice(["yes", "no"])


def test_a_schema_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(SCHEMA)))
    got = cli_format("--json-schema", "-")
    assert got is not None and json.loads(got.json_schema) == SCHEMA


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The error line of a CLI usage error (exit status 2)."""
    with pytest.raises(SystemExit) as usage:
        parse(list(argv))
    assert usage.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_format_flags_are_usage_errors_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.lark").write_bytes(b'start: "\xe9"')
    missing = str(tmp_path / "missing.json")

    def err(*argv: str) -> str:
        return usage_error(capsys, "generate", "hi", *argv)

    assert err("--json-schema", missing) == (
        f"treadle: error: argument --json-schema: cannot read {missing!r}: "
        "No such file or directory"
    )
    assert err("--json-schema", str(tmp_path / "bad.json")).startswith(
        f"treadle: error: argument --json-schema: {str(tmp_path / 'bad.json')!r} is not JSON: "
    )
    assert err("--json-schema", str(tmp_path / "list.json")).endswith(
        "holds a JSON array, not a schema object"
    )
    assert err("--grammar", missing).startswith("treadle: error: argument --grammar: cannot read")
    assert err("--grammar", str(tmp_path / "latin1.lark")).endswith("is not UTF-8 text")
    assert err("--regex", "a", "--choice", "b").endswith(
        "argument --choice: not allowed with argument --regex"
    )
    assert err("--json-object", "--grammar", missing).endswith(
        "argument --grammar: not allowed with argument --json-object"
    )


def test_stdin_is_read_for_one_thing_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error(capsys, "generate", "-", "--json-schema", "-") == (
        "treadle: error: argument --json-schema: '-' reads stdin, which holds the prompt"
    )
    assert usage_error(capsys, "chat", "--grammar", "-") == (
        "treadle: error: argument --grammar: '-' reads stdin, which holds the conversation"
    )
