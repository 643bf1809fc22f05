"""Health-check latency while huge prompts arrive (issue 8, C2).

    python bench/health_probe.py                 # 3 senders of 4 MB prompts, 20 s of probes

A real `treadle serve` (the embedded model) gets `--senders` clients that send
4 MB prompts back to back (each is refused with INVALID_ARGUMENT, after its
characters are counted and before anything is tokenized), while one client
checks grpc.health.v1 every 20 ms. Reported: the health checks' latency
p50/p99/max, how many prompts were sent and how they were answered. Goal:
p99 under 100 ms (Kubernetes' liveness timeout is 5 s). Results go to
bench/results/health-<stamp>.json/.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.environment import environment
from bench.grpc_client import wait_serving
from bench.progress import Progress
from bench.report import write_documents
from bench.server_process import server_env, start_server
from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
PROMPT_BYTES = 4_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--senders", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between health checks")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return ap.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def probe(args: argparse.Namespace, target: str) -> dict[str, Any]:
    prompt = "x" * PROMPT_BYTES
    answers: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    stop_at = time.monotonic() + args.seconds

    async def sender() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            while time.monotonic() < stop_at:
                try:
                    await stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=30)
                    answers["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    answers[err.code().name] += 1

    async def checker() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(args.interval)  # the probe's period, not a synchronisation

    await asyncio.gather(checker(), *(sender() for _ in range(args.senders)))
    ms = [x * 1000 for x in latencies]
    return {
        "health_checks": len(ms),
        "health_p50_ms": round(statistics.median(ms), 2),
        "health_p99_ms": round(percentile(ms, 0.99), 2),
        "health_max_ms": round(max(ms), 2),
        "prompts_sent": sum(answers.values()),
        "prompt_answers": dict(answers),
    }


async def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    command = [sys.executable, "-m", "treadle.client.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", "0", "--metrics-port", "-1", "--http-port", "-1"]
    server = await start_server(command, server_env(os.environ, None), progress, timeout_s=600)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            await wait_serving(channel, timeout_s=600)
        progress.say(f"{args.senders} senders of {PROMPT_BYTES:,}-byte prompts, {args.seconds} s")
        return await probe(args, server.target)
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(label="health")
    started = datetime.now(UTC)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "command": [sys.executable, "bench/health_probe.py", *(argv or sys.argv[1:])],
        "senders": args.senders,
        "prompt_bytes": PROMPT_BYTES,
        **asyncio.run(run(args, progress)),
        "environment": environment(),
    }
    report["goal_met"] = report["health_p99_ms"] < 100
    md = "\n".join(
        [
            f"# Health checks under huge prompts, {report['started']}",
            "",
            f"`{' '.join(report['command'])}`",
            "",
            f"{report['senders']} clients sent {report['prompts_sent']} prompts of "
            f"{PROMPT_BYTES:,} bytes ({report['prompt_answers']}) while "
            f"{report['health_checks']} health checks ran: p50 {report['health_p50_ms']} ms, "
            f"p99 {report['health_p99_ms']} ms, max {report['health_max_ms']} ms "
            f"(goal: p99 under 100 ms: {'met' if report['goal_met'] else 'NOT met'}).",
            "",
        ]
    )
    for path in write_documents("health", report, md, args.out, started)[:2]:
        progress.say(f"wrote {path}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
