"""120 JSON Schemas through the engine, greedy and sampled: every finished output validates.

100 schemas are drawn by a seeded generator (nested objects, arrays with
bounds, enums, integers and numbers with ranges, required and optional
properties, strings with patterns and lengths, anyOf, additionalProperties
false) and 20 are the hand-written ones of bench/schemas/. A tiny random model
writes whatever the mask lets through, so an output that ended by its format
(EOS) must parse and validate with `jsonschema`; most must end that way (143
of the 200 drawn, 15 of the 40 written, when this was written).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
from helpers import run_checked

from treadle.api.outcome import FinishReason
from treadle.api.params import ResponseFormat
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.generation_request import GenerationRequest
from treadle.worker.loader import LoadedModel

BENCH_SCHEMAS = Path(__file__).resolve().parents[2] / "bench" / "schemas"
WORDS = ["red", "green", "blue", "north", "south", "alpha", "beta", "x", "y z"]


def leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "pattern", "enum", "integer", "number", "boolean", "null"])
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([r"^[a-z]{1,5}$", r"^[A-Z][0-9]{2}$"])}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": -1.5, "maximum": rng.choice([2.5, 100.0])}
    return {"type": kind}


def node(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth > 0 and roll < 0.25:
        return obj(rng, depth - 1)
    if depth > 0 and roll < 0.45:
        items = node(rng, depth - 1)
        low = rng.randint(0, 2)
        return {
            "type": "array",
            "items": items,
            "minItems": low,
            "maxItems": low + rng.randint(0, 3),
        }
    if roll < 0.55:
        return {"anyOf": [leaf(rng), leaf(rng)]}
    return leaf(rng)


def obj(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(
        ["id", "name", "kind", "size", "tags", "meta", "when", "ok", "n"], rng.randint(1, 4)
    )
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: node(rng, depth) for name in names},
        "required": [n for n in names if rng.random() < 0.7],
    }
    if rng.random() < 0.6:
        schema["additionalProperties"] = False
    return schema


def schemas() -> list[dict[str, Any]]:
    rng = random.Random(11)
    drawn = [obj(rng, depth=rng.randint(0, 3)) for _ in range(100)]
    written = [json.loads(p.read_text()) for p in sorted(BENCH_SCHEMAS.glob("*.json"))]
    assert len(written) == 20
    return drawn + written


def test_every_finished_output_validates_against_its_schema(tiny: LoadedModel) -> None:
    engine = Engine(tiny, EngineConfig(max_batch_rows=64, max_seq_len=512, block_size=16))
    all_schemas = schemas()
    gens = []
    for i, schema in enumerate(all_schemas):
        fmt = ResponseFormat("json_schema", json.dumps(schema))
        for mode, extra in (("greedy", {}), ("sampled", {"temperature": 1.0, "seed": i})):
            gens.append(
                GenerationRequest(
                    prompt=f"Record {i} as JSON:",
                    request_id=f"{mode}-{i}",
                    max_new_tokens=300,
                    response_format=fmt,
                    **extra,
                )
            )
    got, _ = run_checked(engine, gens)
    finished = {"drawn": 0, "written": 0}
    for gen in gens:
        assert gen.request_id is not None and gen.response_format is not None
        out = got[gen.request_id]
        reason = out.finish.reason
        assert reason in (FinishReason.EOS, FinishReason.LENGTH), (gen.request_id, out.finish)
        if reason is FinishReason.EOS:
            finished["drawn" if int(gen.request_id.split("-")[1]) < 100 else "written"] += 1
            schema = json.loads(gen.response_format.value)
            try:
                document = json.loads(out.text)
            except json.JSONDecodeError as exc:
                raise AssertionError(f"{gen.request_id}: {out.text!r} {out.tokens}") from exc
            jsonschema.validate(document, schema)
    # Strings the schemas bound close; free text (the written schemas' descriptions, extra
    # properties where additionalProperties is not false) often runs to the budget.
    assert finished["drawn"] >= 120 and finished["written"] >= 8, finished
