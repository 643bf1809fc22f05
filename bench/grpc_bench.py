"""W1 and W2 through the server's frontends, against the in-process engine, in one run.

    python bench/grpc_bench.py [--requests N] [--out bench/results] [--model SPEC] [--rate R]

The runs, in order: W1 on the in-process engine (before any server starts,
so the two never share the cores); `treadle serve` as a subprocess, then W1
and W2 over gRPC from streaming clients in this process, then SIGTERM (the
server must exit 0); a fresh `treadle serve` with its HTTP frontend on, W1
over HTTP streaming (OpenAI's chat completions), SIGTERM (`--no-http` leaves
it out); then W2 on the in-process engine at the same arrivals. Each
frontend's W1 starts on a fresh server, so neither finds the other's prompts
in the prefix cache. Progress goes to stderr; the markdown summary to stdout;
every figure to `<out>/grpc-<UTC stamp>.json` and `.md` (and
`grpc-latest.*`), rewritten after each run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
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
from bench.http_client import check_http_model, http_client, http_stream, wait_ready, warm_up_http
from bench.progress import Progress
from bench.run_result import BenchmarkError, RunResult
from bench.server_process import ServerProcess, serve_command, server_env, start_server
from bench.streamed_runs import run_closed_loop, run_open_loop
from bench.treadle_run import run_treadle, run_treadle_open_loop
from bench.workload import Workload
from treadle.v1 import treadle_pb2_grpc as pb_grpc
from treadle.worker.loader import LoadedModel

REPO = Path(__file__).resolve().parent.parent

OnResult = Callable[[RunResult], None]
# What runs against a SERVING server: given the process and a channel to its gRPC port.
ServedRuns = Callable[[ServerProcess, grpc.aio.Channel], Awaitable[list[RunResult]]]


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


async def run_http_runs(
    base_url: str,
    channel: grpc.aio.Channel,
    workload: Workload,
    settings: GrpcSettings,
    model: str,
    progress: Progress,
    on_result: OnResult,
) -> list[RunResult]:
    """W1 over HTTP streaming ("w1_http") through the frontend at `base_url` of a SERVING server.

    Checks the server as `run_grpc_runs` does (on `channel`), then that the
    HTTP frontend is ready and serves `model`. The clients share one
    connection pool, a connection per client. Raises BenchmarkError if a
    check fails or a request does not stream exactly its budget.
    """
    await check_server(pb_grpc.GenerationStub(channel), workload, model, settings.max_batch_rows)
    async with http_client(base_url, settings.clients) as client:
        await wait_ready(client, settings.server_timeout_s)
        await check_http_model(client, model)
        if settings.warmup:
            await warm_up_http(client, model, workload.items[0])
        progress.say(f"w1_http: start, {settings.clients} closed-loop clients")
        stream = http_stream(client, model)
        w1 = await run_closed_loop("w1_http", stream, workload, settings.clients, progress)
    on_result(w1)
    return [w1]


async def run_served(
    command: list[str],
    env: Mapping[str, str],
    settings: GrpcSettings,
    progress: Progress,
    runs: ServedRuns,
) -> int:
    """Start `command` (a `treadle serve`), wait for SERVING, await `runs`, SIGTERM it.

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
            await server.guard(runs(server, channel), None, "during the runs")
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
    ap.add_argument("--no-http", action="store_true", help="skip W1 over HTTP (and its server)")
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
        http=not args.no_http,
        server_timeout_s=args.server_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """Load the model and workload, run everything in order, write and print the report."""
    args = parse_args(argv)
    settings = settings_from(args)
    command_line = sys.argv if argv is None else [__file__, *argv]
    run = start_bench(args, settings, command_line, label="grpc")
    started, progress, loaded, workload = run.started, run.progress, run.loaded, run.workload
    model, config = loaded.name, settings.engine_config()
    results: dict[str, RunResult] = {}

    def record(result: RunResult) -> None:
        results[result.name] = result
        progress.say(
            f"{result.name}: done, {result.useful_tokens:,} tokens in {result.wall_s:.1f} s, "
            f"{result.tokens_per_s:.1f} tok/s"
        )
        write_grpc_report(build_grpc_report(results, **context), args.out, started)

    async def grpc_runs(server: ServerProcess, channel: grpc.aio.Channel) -> list[RunResult]:
        return await run_grpc_runs(channel, workload, settings, model, progress, record)

    async def http_runs(server: ServerProcess, channel: grpc.aio.Channel) -> list[RunResult]:
        url = await server.http_url(settings.server_timeout_s)
        return await run_http_runs(url, channel, workload, settings, model, progress, record)

    # each server in turn (report key, command line, its runs); "server" is the gRPC runs'
    phases = [("server", serve_command(config, args.model, args.device), grpc_runs)]
    if settings.http:
        command = serve_command(config, args.model, args.device, http=True)
        phases.append(("http_server", command, http_runs))
    servers: dict[str, dict[str, Any]] = {
        key: {"command": command, "exit_code": None} for key, command, _ in phases
    }
    context: dict[str, Any] = {**run.context, **servers}

    progress.say("w1_inprocess: start")
    record(run_w1_inprocess(loaded, workload, settings, progress))
    env = server_env(os.environ, args.threads)
    for key, command, runs in phases:
        served = run_served(command, env, settings, progress, runs)
        servers[key]["exit_code"] = asyncio.run(served)
    if settings.w2_inprocess:
        rate = settings.w2_rate(capacity_rps(results["w1_grpc"]))
        progress.say(f"w2_inprocess: start, Poisson arrivals at {rate:.3f} requests/s")
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
