"""W3 "long prompt": streams decode, then one long prompt arrives; do the streams stall?

    python bench/w3.py [--model SPEC] [--streams 16] [--budget 120] [--delay 4]
                       [--prompt-tokens 1900] [--out bench/results]

Three runs in one process on one loaded model: with a budget that takes the
whole prompt in one step (how wave 1 prefilled), with treadle's default step
token budget (chunked prefill), and the whole-prompt run again. Each run:
`--streams` requests decode `--budget` tokens each (EOS ignored, greedy);
`--delay` seconds later one prompt of `--prompt-tokens` tokens arrives (8 new
tokens). Reported: the streams' inter-token gap p50, p99 and max, and the long
prompt's time to first token. Goals (DESIGN.md W3): max gap <= 3x p50 with
chunks; the prompt's TTFT no worse than 2x the whole-prompt runs' mean (two
runs bracketing the chunked one, as W1 brackets treadle with two ceilings: the
machines' speed drifts by more than the figures compared). Figures go to
`<out>/w3-<stamp>.json/.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.progress import Progress
from bench.scenario import Scenario, scenario_parser
from bench.stream_clock import Timed, stream_timed
from bench.workload import Workload, default_workload_path, load_workload
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.generation_request import GenerationRequest
from treadle.scheduler.step_budget import chunk_cost
from treadle.worker.loader import LoadedModel
from treadle.worker.step_cost import attention_span

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = scenario_parser(__doc__.split("\n\n")[0], REPO / "bench" / "results")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--budget", type=int, default=120, help="new tokens of each stream")
    ap.add_argument("--delay", type=float, default=4.0, help="seconds before the long prompt")
    ap.add_argument("--prompt-tokens", type=int, default=1900)
    ap.add_argument(
        "--step-token-budget", type=int, default=None, help="default: the engine's default"
    )
    return ap.parse_args(argv)


def long_prompt(prompts: tuple[tuple[int, ...], ...], n: int) -> list[int]:
    """`n` tokens of real text: W1's prompts, concatenated and repeated."""
    ids: list[int] = []
    while len(ids) < n:
        for prompt in prompts:
            ids.extend(prompt)
    return ids[:n]


async def scenario(engine: Engine, args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    prompt = long_prompt(workload.prompts, args.prompt_tokens)
    streams = [
        asyncio.create_task(
            stream_timed(
                engine,
                GenerationRequest(
                    prompt_token_ids=list(ids),
                    max_new_tokens=args.budget,
                    ignore_eos=True,
                    request_id=f"s{i}",
                ),
                Timed(),
            )
        )
        for i, ids in enumerate(workload.prompts[: args.streams])
    ]
    await asyncio.sleep(args.delay)  # the workload's shape, not synchronisation
    long = await stream_timed(
        engine,
        GenerationRequest(
            prompt_token_ids=prompt, max_new_tokens=8, ignore_eos=True, request_id="long"
        ),
        Timed(),
    )
    done = await asyncio.gather(*streams)
    window = (long.sent, long.token_times[0])  # while the long prompt was being prefilled
    gaps = [g for t in done for g in t.gaps]
    during = [
        b - a
        for t in done
        for a, b in zip(t.token_times, t.token_times[1:], strict=False)
        if b > a and b >= window[0] and a <= window[1]
    ]
    return {
        "long_prompt_ttft_s": round(long.ttft, 4),
        "gap_s": _stats(gaps),
        "gap_during_prefill_s": _stats(during),
    }


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4), "max": round(max(values), 4)}


def run(
    loaded: LoadedModel,
    workload: Workload,
    args: argparse.Namespace,
    name: str,
    budget: int | None,
    progress: Progress,
) -> dict[str, Any]:
    engine = Engine(loaded, EngineConfig(max_batch_rows=64, step_token_budget=budget))
    engine.start()
    try:
        progress.say(f"{name} (step token budget {budget}): start")
        figures = asyncio.run(scenario(engine, args, workload))
    finally:
        engine.stop()
    progress.say(f"{name}: {json.dumps(figures)}")
    return {"run": name, "step_token_budget": budget or "default", **figures}


def main(argv: list[str] | None = None) -> int:
    sc = Scenario.start("w3", parse_args(argv))
    args = sc.args
    workload = load_workload(default_workload_path(REPO), sc.loaded.tokenizer)
    # The whole prompt in one step (how wave 1 prefilled): the budget its chunk costs there.
    span = attention_span(sc.loaded.model)
    whole = args.streams + math.ceil(chunk_cost(0, args.prompt_tokens, span))
    order = (("whole_before", whole), ("chunked", args.step_token_budget), ("whole", whole))
    runs = [run(sc.loaded, workload, args, name, b, sc.progress) for name, b in order]
    before, chunked, after = runs
    gap = chunked["gap_s"]
    whole_ttft = (before["long_prompt_ttft_s"] + after["long_prompt_ttft_s"]) / 2
    goals = {
        "max_gap_over_p50": round(gap["max"] / gap["p50"], 2) if gap else None,
        "ttft_over_whole_prompt_runs": round(chunked["long_prompt_ttft_s"] / whole_ttft, 2),
    }
    report = sc.report(runs, goals)
    sc.write(report, render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# W3, {report['started']}",
        "",
        f"{report['model']}; {report['environment'].get('torch', '')}",
        "",
        "| run | step token budget | gap p50 s | gap p99 s | gap max s "
        "| gap max during prefill s | long prompt TTFT s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        g, d = r["gap_s"], r["gap_during_prefill_s"]
        lines.append(
            f"| {r['run']} | {r['step_token_budget']} | {g.get('p50')} | {g.get('p99')} "
            f"| {g.get('max')} "
            f"| {d.get('max')} | {r['long_prompt_ttft_s']} |"
        )
    goals = report["goals"]
    lines += [
        "",
        f"- chunked: max gap / p50 gap = {goals['max_gap_over_p50']} (goal <= 3)",
        f"- long prompt TTFT, chunked / whole prompt in one step (the two runs' mean) = "
        f"{goals['ttft_over_whole_prompt_runs']} (goal <= 2)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
