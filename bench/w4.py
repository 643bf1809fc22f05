"""W4 "shared prefix": chat requests sharing one long system prompt, with and without the cache.

    python bench/w4.py [--model SPEC] [--requests 256] [--system-tokens 1000]
                       [--clients 64] [--new-tokens 32] [--out bench/results]

Two runs in one process on one loaded model, same requests: the prefix cache
on (the default) and off (`prefix_cache=False`). Each request is a chat: one
system prompt of about `--system-tokens` tokens shared by all, then a
distinct short question (W1's user messages); `--new-tokens` tokens each, EOS
ignored, greedy; `--clients` closed-loop clients. Reported per run: time to
first token p50/p99, end-to-end p50, wall time, tokens/s, cached prompt
tokens. Goal (DESIGN.md W4): TTFT p50 at least 5x better with the cache.
On a CPU, 256 uncached 1,000-token prefills take many minutes: pass
`--requests 32` there. Figures go to `<out>/w4-<stamp>.json/.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.progress import Progress
from bench.scenario import Scenario, scenario_parser
from bench.stream_clock import Timed, stream_timed
from bench.traces import percentiles
from bench.workload import default_workload_path, read_items
from treadle.api.params import ChatMessage
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.generation_request import GenerationRequest
from treadle.worker.loader import LoadedModel

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = scenario_parser(__doc__.split("\n\n")[0], REPO / "bench" / "results")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    return ap.parse_args(argv)


def build_requests(loaded: LoadedModel, args: argparse.Namespace) -> list[GenerationRequest]:
    """One shared system prompt (W1's user messages joined, cut to `--system-tokens` tokens)
    and one distinct W1 question per request."""
    questions = [
        m.content
        for item in read_items(default_workload_path(REPO))
        for m in item.messages
        if m.role == "user"
    ]
    text = " ".join(questions)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: args.system_tokens]
    system = "You answer questions. Background notes: " + loaded.tokenizer.decode(ids)
    return [
        GenerationRequest(
            messages=[
                ChatMessage("system", system),
                ChatMessage("user", questions[i % len(questions)]),
            ],
            max_new_tokens=args.new_tokens,
            ignore_eos=True,
            request_id=f"q{i}",
        )
        for i in range(args.requests)
    ]


async def closed_loop(
    engine: Engine, requests: list[GenerationRequest], clients: int, progress: Progress, label: str
) -> list[Timed]:
    queue = list(reversed(requests))
    done: list[Timed] = []

    async def client() -> None:
        while queue:
            gen = queue.pop()
            done.append(await stream_timed(engine, gen, Timed()))
            if len(done) % 32 == 0:
                progress.say(f"{label}: {len(done)}/{len(requests)} requests")

    await asyncio.gather(*(client() for _ in range(clients)))
    return done


def run(
    loaded: LoadedModel,
    requests: list[GenerationRequest],
    args: argparse.Namespace,
    prefix_cache: bool,
    progress: Progress,
) -> dict[str, Any]:
    label = "cache on" if prefix_cache else "cache off"
    engine = Engine(loaded, EngineConfig(max_batch_rows=64, prefix_cache=prefix_cache))
    engine.start()
    try:
        progress.say(f"{label}: start")
        started = time.perf_counter()
        done = asyncio.run(closed_loop(engine, requests, args.clients, progress, label))
        wall = time.perf_counter() - started
    finally:
        engine.stop()
    cached = sum(t.finish.usage.cached_prompt_tokens for t in done if t.finish)
    prompt = sum(t.finish.usage.prompt_tokens for t in done if t.finish)
    figures = {
        "prefix_cache": prefix_cache,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(len(done) * args.new_tokens / wall, 2),
        "ttft_s": percentiles([t.ttft for t in done]),
        "e2e_s": percentiles([t.token_times[-1] - t.sent for t in done]),
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
    }
    progress.say(f"{label}: {json.dumps(figures)}")
    return figures


def main(argv: list[str] | None = None) -> int:
    sc = Scenario.start("w4", parse_args(argv))
    requests = build_requests(sc.loaded, sc.args)
    runs = [run(sc.loaded, requests, sc.args, on, sc.progress) for on in (True, False)]
    on, off = runs
    goals = {"ttft_p50_off_over_on": round(off["ttft_s"]["p50"] / on["ttft_s"]["p50"], 2)}
    report = sc.report(runs, goals)
    sc.write(report, render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# W4, {report['started']}",
        "",
        f"{report['model']}; {report['settings']['requests']} requests",
        "",
        "| prefix cache | TTFT p50 s | TTFT p99 s | e2e p50 s | wall s | tok/s "
        "| cached / prompt tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {'on' if r['prefix_cache'] else 'off'} | {r['ttft_s']['p50']} "
            f"| {r['ttft_s']['p99']} | {r['e2e_s']['p50']} | {r['wall_s']} "
            f"| {r['tokens_per_s']} | {r['cached_prompt_tokens']:,} / {r['prompt_tokens']:,} |"
        )
    ratio = report["goals"]["ttft_p50_off_over_on"]
    lines += ["", f"- TTFT p50 without the cache / with it = {ratio} (goal >= 5)"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
