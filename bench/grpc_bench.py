"""W1 and W2 through the gRPC server, against the in-process engine, in one run.

    python bench/grpc_bench.py [--requests N] [--out bench/results] [--model SPEC] [--rate R]

The runs, in order: W1 on the in-process engine (before the server starts,
so the two never share the cores); `treadle serve` as a subprocess, then W1
and W2 over gRPC from streaming clients in this process, then SIGTERM (the
server must exit 0); then W2 on the in-process engine at the same arrivals.
Progress goes to stderr; the markdown summary to stdout; every figure to
`<out>/grpc-<UTC stamp>.json` and `.md` (and `grpc-latest.*`), rewritten
after each run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench.bench_start import start_bench
from bench.cli_args import common_parser
from bench.grpc_client import check_server, grpc_stream, wait_serving, warm_up
from bench.grpc_report import build_grpc_report, render_grpc_markdown, write_grpc_report
from bench.grpc_settings import GrpcSettings
from bench.progress import Progress
from bench.run_result import BenchmarkError, RunResult
from bench.server_process import serve_command, server_env, start_server
from bench.streamed_runs import run_closed_loop, run_open_loop
from bench.treadle_run import run_treadle, run_treadle_open_loop
from bench.workload import Workload
from treadle.v1 import treadle_pb2_grpc as pb_grpc
from treadle.worker.loader import LoadedModel

REPO = Path(__file__).resolve().parent.parent

OnResult = Callable[[RunResult], None]


def capacity_rps(w1: RunResult) -> float:
    """What a closed-loop W1 run sustained, in requests per second."""
    return w1.requests / w1.wall_s


def run_w1_inprocess(
    loaded: LoadedModel, workload: Workload, settings: GrpcSettings, progress: Progress
) -> RunResult:
    """The W1 reference: `run_treadle` (closed-loop clients on `Engine.generate`)."""
    result = run_treadle(
        loaded,
        workload,
        settings.engine_config(),
        progress,
        clients=settings.clients,
        warmup=settings.warmup,
    )
    return dataclasses.replace(result, name="w1_inprocess")


async def run_grpc_runs(
    channel: grpc.aio.Channel,
    workload: Workload,
    settings: GrpcSettings,
    model: str,
    progress: Progress,
    on_result: OnResult,
) -> list[RunResult]:
    """W1 ("w1_grpc") then W2 ("w2_grpc") through a SERVING server on `channel`.

    Checks first that the server runs `model` with the settings' batch rows
    and sees the workload's prompt ids. W2's rate is `settings.w2_rate` of
    the W1 capacity just measured. `on_result` gets each run as it ends.
    Raises BenchmarkError if a check fails or a request does not stream
    exactly its budget.
    """
    stub = pb_grpc.GenerationStub(channel)
    await check_server(stub, workload, model, settings.max_batch_rows)
    stream = grpc_stream(stub)
    if settings.warmup:
        await warm_up(stub, workload.items[0])
    progress.say(f"w1_grpc: start, {settings.clients} closed-loop clients")
    w1 = await run_closed_loop("w1_grpc", stream, workload, settings.clients, progress)
    on_result(w1)
    rate = settings.w2_rate(capacity_rps(w1))
    progress.say(f"w2_grpc: start, Poisson arrivals at {rate:.3f} requests/s")
    w2 = await run_open_loop("w2_grpc", stream, workload, rate, settings.seed, progress)
    on_result(w2)
    return [w1, w2]


async def run_served(
    command: list[str],
    env: Mapping[str, str],
    workload: Workload,
    settings: GrpcSettings,
    model: str,
    progress: Progress,
    on_result: OnResult,
) -> int:
    """Start `command` (a `treadle serve`), wait for SERVING, `run_grpc_runs`, SIGTERM it.

    Returns the server's exit code; raises BenchmarkError if the server
    fails to start in `settings.server_timeout_s`, exits early, or exits
    with a code other than 0.
    """
    progress.say("server: starting " + " ".join(command[1:]))
    server = await start_server(command, env, progress, settings.server_timeout_s)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            wait = settings.server_timeout_s
            await server.guard(wait_serving(channel, wait), wait, "before SERVING")
            runs = run_grpc_runs(channel, workload, settings, model, progress, on_result)
            await server.guard(runs, None, "during the runs")
    finally:
        progress.say("server: SIGTERM")
        code = await server.stop()
    if code != 0:
        raise BenchmarkError(f"the server exited with {code} after SIGTERM{server.tail()}")
    progress.say("server: exited 0")
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = GrpcSettings()
    ap = common_parser(__doc__, REPO, d)
    ap.add_argument(
        "--load", type=float, default=d.load, help="W2's arrival rate over the W1 gRPC capacity"
    )
    ap.add_argument(
        "--rate", type=float, default=None, help="W2's arrivals per second; None: --load x capacity"
    )
    ap.add_argument("--seed", type=int, default=d.seed, help="seeds W2's Poisson arrivals")
    ap.add_argument(
        "--no-w2-inprocess", action="store_true", help="skip W2 on the in-process engine"
    )
    ap.add_argument(
        "--server-timeout",
        type=float,
        default=d.server_timeout_s,
        help="most seconds from starting the server to SERVING",
    )
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> GrpcSettings:
    return GrpcSettings(
        requests=args.requests,
        warmup=not args.no_warmup,
        clients=args.clients,
        max_batch_rows=args.max_batch_rows,
        max_seq_len=args.max_seq_len,
        step_token_budget=args.step_token_budget,
        kv_cache_memory=args.kv_cache_memory,
        prefix_cache=args.prefix_cache,
        load=args.load,
        rate=args.rate,
        seed=args.seed,
        w2_inprocess=not args.no_w2_inprocess,
        server_timeout_s=args.server_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """Load the model and workload, run everything in order, write and print the report."""
    args = parse_args(argv)
    settings = settings_from(args)
    command_line = sys.argv if argv is None else [__file__, *argv]
    run = start_bench(args, settings, command_line, label="grpc")
    started, progress, loaded, workload = run.started, run.progress, run.loaded, run.workload
    command = serve_command(settings.engine_config(), args.model, args.device)
    server: dict[str, Any] = {"command": command, "exit_code": None}
    context: dict[str, Any] = {**run.context, "server": server}
    results: dict[str, RunResult] = {}

    def record(result: RunResult) -> None:
        results[result.name] = result
        progress.say(
            f"{result.name}: done, {result.useful_tokens:,} tokens in {result.wall_s:.1f} s, "
            f"{result.tokens_per_s:.1f} tok/s"
        )
        write_grpc_report(build_grpc_report(results, **context), args.out, started)

    progress.say("w1_inprocess: start")
    record(run_w1_inprocess(loaded, workload, settings, progress))
    env = server_env(os.environ, args.threads)
    served = run_served(command, env, workload, settings, loaded.name, progress, record)
    server["exit_code"] = asyncio.run(served)
    if settings.w2_inprocess:
        rate = settings.w2_rate(capacity_rps(results["w1_grpc"]))
        progress.say(f"w2_inprocess: start, Poisson arrivals at {rate:.3f} requests/s")
        config = settings.engine_config()
        record(
            run_treadle_open_loop(
                loaded, workload, config, progress, rate, settings.seed, settings.warmup
            )
        )
    report = build_grpc_report(results, **context)
    paths = write_grpc_report(report, args.out, started)
    progress.say(f"results: {', '.join(str(p) for p in paths)}")
    print(render_grpc_markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
