"""response_format in the engine, on a tiny random llama: outputs match their format.

A random model writes nonsense, so every output here is what the grammar mask
allowed: it parses and validates when the request ended by its format (EOS),
and unconstrained rows sharing the steps are untouched by the constrained ones.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from helpers import drive, run_checked

from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason
from treadle.api.params import ResponseFormat
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.errors import ValidationError
from treadle.scheduler.generation_request import GenerationRequest
from treadle.worker.grammar import GrammarCompiler
from treadle.worker.loader import LoadedModel

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def engine_for(tiny: LoadedModel, **config: Any) -> Engine:
    settings = {"max_batch_rows": 8, "max_seq_len": 256, "block_size": 4, **config}
    return Engine(tiny, EngineConfig(**settings))


def request(rid: str, fmt: ResponseFormat | None, **params: Any) -> GenerationRequest:
    settings: dict[str, Any] = {
        "max_new_tokens": 120,
        "prompt_token_ids": [5, 6, 7, 8 + len(rid)],
        **params,
    }
    return GenerationRequest(request_id=rid, response_format=fmt, **settings)


def test_outputs_follow_their_format_in_one_batch(tiny: LoadedModel) -> None:
    engine = engine_for(tiny)
    formats = {
        "schema": ResponseFormat("json_schema", json.dumps(SCHEMA)),
        "object": ResponseFormat("json_object"),
        "regex": ResponseFormat("regex", r"(yes|no) [0-9]{1,3}"),
        "choice": ResponseFormat("choice", choices=("red", "green", "blue")),
        "lark": ResponseFormat("grammar", 'start: "x" ("," "x")*'),
        "sampled": ResponseFormat("json_schema", json.dumps(SCHEMA)),
    }
    gens = [request(rid, fmt) for rid, fmt in formats.items()]
    gens[-1].temperature, gens[-1].seed = 1.0, 7
    got, _ = run_checked(engine, gens)
    for rid in ("schema", "sampled"):
        assert got[rid].finish.reason is FinishReason.EOS, rid
        jsonschema.validate(json.loads(got[rid].text), SCHEMA)
    assert got["object"].finish.reason in (FinishReason.EOS, FinishReason.LENGTH)
    if got["object"].finish.reason is FinishReason.EOS:
        assert isinstance(json.loads(got["object"].text), dict)
    assert re.fullmatch(r"(yes|no) [0-9]{1,3}", got["regex"].text)
    assert got["choice"].text in ("red", "green", "blue")
    assert got["choice"].finish.reason is FinishReason.EOS
    assert re.fullmatch(r"x(,x)*", got["lark"].text) or got["lark"].finish.reason is (
        FinishReason.LENGTH
    )


def test_unconstrained_rows_are_untouched_by_constrained_ones(tiny: LoadedModel) -> None:
    plain = [request(f"p{i}", None, ignore_eos=True, max_new_tokens=20) for i in range(3)]
    alone = drive(engine_for(tiny), [(0, g) for g in plain])
    mixed = [
        *[request(f"p{i}", None, ignore_eos=True, max_new_tokens=20) for i in range(3)],
        request("c1", ResponseFormat("json_schema", json.dumps(SCHEMA))),
        request("c2", ResponseFormat("choice", choices=("a", "b"))),
    ]
    together = drive(engine_for(tiny), [(i % 2, g) for i, g in enumerate(mixed)])
    for i in range(3):
        assert together[f"p{i}"].tokens == alone[f"p{i}"].tokens


def test_samples_and_preemption_keep_their_own_grammar_state(tiny: LoadedModel) -> None:
    """n = 3 sampled samples and a pool small enough to preempt: each sample's output still
    matches the format, so no state was shared or lost."""
    from helpers import pool_bytes

    engine = engine_for(tiny, kv_cache_memory=pool_bytes(tiny, 96), max_batch_rows=6)
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    gens = [
        request(f"r{i}", fmt, n=3, temperature=1.0, seed=i, max_new_tokens=60) for i in range(2)
    ]
    got, preempted = run_checked(engine, gens)
    assert preempted > 0
    for rid, c in got.items():
        for s in range(3):
            sample = c.sample(s)
            if sample.finish.reason is FinishReason.EOS:
                jsonschema.validate(json.loads(sample.text), SCHEMA)
            else:
                assert sample.finish.reason is FinishReason.LENGTH, (rid, s)


@pytest.mark.parametrize(
    ("fmt", "why"),
    [
        (ResponseFormat("json_schema", "{not json"), "not valid JSON"),
        (ResponseFormat("json_schema", "[1]"), "must be a JSON object"),
        (ResponseFormat("json_schema", '{"type": "frobnicate"}'), "Invalid type: frobnicate"),
        (ResponseFormat("json_schema", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
        (ResponseFormat("regex", "(unclosed"), "error: unclosed group"),
        (ResponseFormat("grammar", "start: undefined_rule"), 'unknown name: "undefined_rule"'),
        (ResponseFormat("choice"), "choices"),
        (ResponseFormat("xml", "<a/>"), "not one of"),
    ],
)
def test_bad_formats_are_refused_before_queueing(
    tiny: LoadedModel, fmt: ResponseFormat, why: str
) -> None:
    engine = engine_for(tiny)
    with pytest.raises(ValidationError, match=f"response_format.*{re.escape(why)}") as info:
        engine.factory.build(request("bad", fmt), "bad", lambda events: None)
    assert info.value.field == "response_format"


def test_format_limits_and_ignore_eos(tiny: LoadedModel) -> None:
    engine = engine_for(tiny)
    big = ResponseFormat("regex", "a" * 70_000)
    with pytest.raises(ValidationError, match="response_format: is 70000 bytes; the limit is"):
        engine.factory.build(request("big", big), "big", lambda events: None)
    many = ResponseFormat("choice", choices=tuple(str(i) for i in range(2000)))
    with pytest.raises(ValidationError, match="response_format: at most 1024 choices"):
        engine.factory.build(request("many", many), "many", lambda events: None)
    eos = request("eos", ResponseFormat("json_object"), ignore_eos=True)
    with pytest.raises(ValidationError, match="cannot be combined with ignore_eos"):
        engine.factory.build(eos, "eos", lambda events: None)
    assert engine.info.response_format_types == (
        "json_schema",
        "json_object",
        "regex",
        "grammar",
        "choice",
    )


def test_a_grammar_is_compiled_once_and_a_slow_one_is_refused_for_good(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiles: list[str] = []
    compile_once = GrammarCompiler._compile

    def counted(self: GrammarCompiler, text: str) -> Any:
        compiles.append(text)
        return compile_once(self, text)

    monkeypatch.setattr(GrammarCompiler, "_compile", counted)
    engine = engine_for(tiny)
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    first = engine.factory.build(request("a", fmt, n=2), "a", lambda events: None)
    second = engine.factory.build(request("b", fmt), "b", lambda events: None)
    assert len(compiles) == 1  # the second request and the second sample reuse it
    states = [first.grammar, first.followers[0].grammar, second.grammar]
    assert all(s is not None for s in states)
    assert len({id(s.matcher) for s in states if s is not None}) == 3  # each its own state

    slow = engine_for(tiny, limits=RequestLimits(response_format_compile_seconds=1e-9))
    fmt = ResponseFormat("regex", "[a-z]+")
    for rid in ("c", "d"):
        with pytest.raises(ValidationError, match=r"response_format: took .* s to compile"):
            slow.factory.build(request(rid, fmt), rid, lambda events: None)
    assert compiles.count(compiles[-1]) == 1  # refused from memory the second time


def test_a_grammar_failing_mid_output_ends_its_request_alone(tiny: LoadedModel) -> None:
    """The fuzz test found a regex of one 4-byte character whose mask allows a byte token
    that llguidance then refuses: that request ends with a short error naming
    response_format (no parser dump); the request beside it is untouched."""
    engine = engine_for(tiny)
    odd = request("odd", ResponseFormat("regex", "\U00040000"), prompt_token_ids=[3])
    plain = request("plain", None, ignore_eos=True, max_new_tokens=6)
    got, _ = run_checked(engine, [odd, plain])
    finish = got["odd"].finish
    if finish.reason is FinishReason.ERROR:
        assert finish.message.startswith("response_format: the grammar refused token")
        assert "<state>" not in finish.message and len(finish.message) < 400
    else:
        assert got["odd"].text == "\U00040000"
    assert got["plain"].finish.reason is FinishReason.LENGTH and len(got["plain"].tokens) == 6


def test_with_chunked_prefill_logprobs_stop_strings_and_plugins(tiny: LoadedModel) -> None:
    """A constrained request with a long prompt fed in chunks, processed logprobs, a stop
    string and a plugin: its alternatives are only tokens the format allows, the stop
    string still ends it, and the plugin runs before the mask."""
    from treadle.api.params import PluginRequest

    engine = engine_for(tiny, step_token_budget=7)
    long_prompt = [5 + (i * 37) % 30000 for i in range(50)]
    colours = ResponseFormat("choice", choices=("red", "green", "blue"))
    logged = request(
        "logged", colours, prompt_token_ids=long_prompt, logprobs=True, top_logprobs=5,
        processed_logprobs=True,
    )  # fmt: skip
    stopped = request("stopped", ResponseFormat("regex", "(ab)+"), stop=["ba"])
    boosted = request(
        "boosted",
        colours,
        plugins=[PluginRequest("phrase_boost", {"phrases": ["blue"], "bias": 50.0})],
    )
    got, _ = run_checked(engine, [logged, stopped, boosted])
    tokenizer = tiny.tokenizer
    first = next(e for e in got["logged"].events if getattr(e, "logprobs", ())).logprobs[0]
    alternatives = [t for t, lp in first.top if lp > float("-inf")]
    assert first.token_id in alternatives
    for token in alternatives:  # any tokenization of a choice, and nothing else
        text = tokenizer.decode([token])
        assert any(c.startswith(text) for c in colours.choices), text
    assert got["logged"].text in colours.choices
    assert got["stopped"].finish.reason is FinishReason.STOP_SEQUENCE
    assert got["stopped"].text in ("a", "")  # "ab" + "a" matched "ba": held back, cut
    assert got["boosted"].text == "blue"  # the plugin's bias picks among what the mask allows
