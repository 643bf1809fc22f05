"""Soak: a bounded fault soak against a real `treadle serve` over gRPC.

    python bench/soak.py                      # 10,000 requests, 64 clients, the default server
    python bench/soak.py --requests 500       # the test suite's size

The server runs with its defaults and the embedded model. 64 closed-loop
clients send the cases of `bench/soak_cases.py` (about 30% cancelled
mid-stream, deadlined or abandoned, 10% malformed). The first `--warmup`
cases warm the server up; resident memory is read after them and again at the
end, once the server is idle. Reported: lost requests (must be 0), wrong
outcomes (must be 0), UNKNOWN/INTERNAL statuses (must be 0), RSS after
warm-up and at the end, and the running requests, queue depth and KV usage
the server reports at the end (must be 0). Exit status 1 when any "must"
fails. Results go to bench/results/soak-<stamp>.json/.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.environment import environment
from bench.grpc_client import chat_of, wait_serving
from bench.progress import Progress
from bench.report import write_documents
from bench.server_process import ServerProcess, server_env, start_server
from bench.soak_cases import BAD_STATUSES, Case, Outcome, draw_cases, run_case
from bench.workload import default_workload_path, read_items
from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
IDLE_GAUGES = ("treadle_running_requests", "treadle_queue_depth", "treadle_kv_usage_ratio")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=None, help="default: 5%% of the requests")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="largest budget of a case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="--model of the server; default: embedded")
    ap.add_argument("--max-batch-rows", type=int, default=None, help="server's; default: its own")
    ap.add_argument("--max-seq-len", type=int, default=None, help="server's; default: its own")
    ap.add_argument(
        "--kv-cache-memory", type=int, default=None, help="server's (bytes); default: its own"
    )
    ap.add_argument(
        "--step-token-budget", type=int, default=None, help="server's; default: its own"
    )
    ap.add_argument("--server-arg", action="append", default=[], help="extra `treadle serve` arg")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--timeout", type=float, default=3600.0, help="bound on the whole run (s)")
    return ap.parse_args(argv)


def serve_args(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "treadle.client.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", "0", "--metrics-port", "0", "--http-port", "-1", "--log-level", "INFO"]
    if args.model:
        command += ["--model", args.model]
    for flag, value in (
        ("--max-batch-rows", args.max_batch_rows),
        ("--max-seq-len", args.max_seq_len),
        ("--kv-cache-memory", args.kv_cache_memory),
        ("--step-token-budget", args.step_token_budget),
    ):
        if value is not None:
            command += [flag, str(value)]
    return command + args.server_arg


def soak_chats() -> list[pb.Chat]:
    """W1's chats (the standard workload), or a few fixed questions where it is absent."""
    path = default_workload_path(REPO)
    if path.exists():
        return [chat_of(item) for item in read_items(path)]
    questions = ["What is the capital of France?", "Name three colours.", "Count to five."]
    return [pb.Chat(messages=[pb.ChatMessage(role="user", content=q)]) for q in questions]


def scrape(port: int) -> list[Any]:
    """Every sample the server's /metrics shows now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
    return [sample for family in families for sample in family.samples]


def gauges(samples: list[Any]) -> dict[str, float]:
    """The unlabelled samples by name."""
    return {s.name: s.value for s in samples if not s.labels}


async def wait_idle(port: int, timeout_s: float = 120.0) -> list[Any]:
    """Poll /metrics (bounded) until nothing runs or waits; returns the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await asyncio.to_thread(scrape, port)
        values = gauges(samples)
        if all(values.get(g, 0.0) == 0.0 for g in IDLE_GAUGES) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.5)  # polling a gauge, not synchronising with a result


async def drive(
    cases: list[Case], stub: pb_grpc.GenerationStub, target: str, clients: int, progress: Progress
) -> list[Outcome]:
    """Closed loop: each client sends its next case as soon as its previous one ends."""
    pending = iter(cases)
    outcomes: list[Outcome] = []

    async def client() -> None:
        for case in pending:
            outcomes.append(await run_case(case, stub, target))
            if len(outcomes) % 500 == 0:
                progress.say(f"{len(outcomes):,}/{len(cases):,} requests done")

    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_kind[o.kind][o.status] += 1
    wrong = [o for o in outcomes if o.wrong and not o.lost]
    return {
        "requests": len(outcomes),
        "lost": sum(o.lost for o in outcomes),
        "wrong": len(wrong),
        "wrong_examples": [f"{o.kind}: {o.wrong}" for o in wrong[:10]],
        "bad_statuses": sum(o.status in {c.name for c in BAD_STATUSES} for o in outcomes),
        "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
    }


async def soak(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    env = server_env(os.environ, threads=None)
    server = await start_server(serve_args(args), env, progress, timeout_s=600)
    try:
        return await _soak_against(server, args, progress)
    finally:
        code = await server.stop()
        progress.say(f"server exited with {code}")


async def _soak_against(
    server: ServerProcess, args: argparse.Namespace, progress: Progress
) -> dict[str, Any]:
    metrics_port = await server.guard(asyncio.shield(server.metrics_port), 60, "before /metrics")
    async with grpc.aio.insecure_channel(server.target) as channel:
        await wait_serving(channel, timeout_s=600)
        stub = pb_grpc.GenerationStub(channel)
        info = await stub.ModelInfo(pb.ModelInfoRequest())
        chats = soak_chats()
        cases = draw_cases(chats, args.requests, args.seed, args.max_new_tokens)
        warmup = args.warmup if args.warmup is not None else max(1, args.requests // 20)
        process = psutil.Process(server.proc.pid)
        progress.say(f"{info.model}: {warmup} warm-up requests, then {len(cases) - warmup}")
        started = time.monotonic()
        outcomes = await drive(cases[:warmup], stub, server.target, args.clients, progress)
        await wait_idle(metrics_port)
        rss_warm = process.memory_info().rss
        outcomes += await drive(cases[warmup:], stub, server.target, args.clients, progress)
        idle = await wait_idle(metrics_port)
        rss_end = process.memory_info().rss
        elapsed = time.monotonic() - started
    summary = summarise(outcomes)
    return {
        **summary,
        "model": info.model,
        "clients": args.clients,
        "warmup_requests": warmup,
        "seconds": round(elapsed, 1),
        "rss_after_warmup_mb": round(rss_warm / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_end / rss_warm - 1, 4),
        "server_at_end": {g: gauges(idle).get(g) for g in IDLE_GAUGES},
        "finished_by_reason": finished_by_reason(idle),
    }


def finished_by_reason(samples: list[Any]) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value for s in samples if s.name == "treadle_requests_finished_total"
    }


def failures(report: dict[str, Any]) -> list[str]:
    """What the soak promises and this run broke."""
    broken = [f"{k}: {report[k]}" for k in ("lost", "wrong", "bad_statuses") if report[k]]
    broken += [f"{g} at the end: {v}" for g, v in report["server_at_end"].items() if v]
    return broken


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Soak, {report['started']}",
        "",
        f"`{' '.join(report['command'])}`",
        "",
        f"{report['requests']:,} requests from {report['clients']} clients in "
        f"{report['seconds']} s against `treadle serve` ({report['model']}).",
        "",
        f"- lost: {report['lost']}; wrong outcomes: {report['wrong']}; "
        f"UNKNOWN/INTERNAL: {report['bad_statuses']}",
        f"- RSS after warm-up {report['rss_after_warmup_mb']} MB, at the end "
        f"{report['rss_end_mb']} MB ({report['rss_growth']:+.1%})",
        f"- server at the end: {report['server_at_end']}",
        f"- finished by reason (server): {report['finished_by_reason']}",
        "",
        "| kind | outcomes |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in report["by_kind"].items()),
        "",
        *(f"- {w}" for w in report["wrong_examples"]),
        f"**{'FAILED: ' + '; '.join(report['failures']) if report['failures'] else 'passed'}**",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(label="soak")
    started = datetime.now(UTC)

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.timeout):
            return await soak(args, progress)

    report = asyncio.run(bounded())
    report = {
        "started": started.isoformat(timespec="seconds"),
        "command": [sys.executable, "bench/soak.py", *(argv if argv is not None else sys.argv[1:])],
        **report,
        "environment": environment(),
    }
    report["failures"] = failures(report)
    for path in write_documents("soak", report, markdown(report), args.out, started)[:2]:
        progress.say(f"wrote {path}")
    print(markdown(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
