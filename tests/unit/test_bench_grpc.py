"""The frontend benchmark (bench/grpc_bench.py): schedules, clients (gRPC and HTTP), accounting,
reports, the server."""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `bench`

from bench_workload import BUDGETS, write_workload
from e2e.served import start_served
from helpers import make_tiny_model

from bench.arrivals import observed_rate, poisson_arrivals
from bench.grpc_bench import main, run_grpc_runs, run_http_runs
from bench.grpc_client import check_finish, grpc_stream
from bench.grpc_settings import GrpcSettings
from bench.http_client import chat_body, check_http_model, http_client, http_stream, sse_data
from bench.progress import Progress
from bench.run_result import BenchmarkError, RunResult
from bench.server_process import serve_command, server_env, start_server
from bench.streamed_runs import run_closed_loop, run_open_loop
from bench.traces import StreamFn, Trace, percentiles
from bench.workload import WorkItem, Workload
from treadle.scheduler.engine import EngineConfig
from treadle.scheduler.generation_request import ChatMessage
from treadle.server.serve_cli import add_serve_arguments
from treadle.server.server import ServerConfig
from treadle.v1 import treadle_pb2 as pb
from treadle.worker.loader import LoadedModel

# EngineConfig fields a `treadle serve` flag of the same name sets (serve_command passes them)
ENGINE_FLAGS = (
    "max_batch_rows",
    "max_seq_len",
    "kv_cache_memory",
    "block_size",
    "step_token_budget",
    "prefix_cache",
    "max_waiting",
)


def quiet() -> Progress:
    return Progress(io.StringIO(), interval_s=3600)


def ignore(result: RunResult) -> None:
    pass


# -- the schedule and the figures ------------------------------------------------------------
def test_poisson_arrivals_are_seeded_increasing_and_at_the_rate() -> None:
    arrivals = poisson_arrivals(20_000, rate=4.0, seed=7)
    assert arrivals == poisson_arrivals(20_000, rate=4.0, seed=7)
    assert arrivals[:5] != poisson_arrivals(5, rate=4.0, seed=8)
    assert observed_rate(len(arrivals), arrivals[-1]) == pytest.approx(4.0, rel=0.03)
    gaps = [b - a for a, b in itertools.pairwise([0.0, *arrivals])]
    assert min(gaps) > 0  # increasing, from after the start
    # exponential gaps: the standard deviation equals the mean
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(3, rate=0.0, seed=0)


def test_trace_figures_count_a_multi_token_event_as_one_gap() -> None:
    trace = Trace(0, sent=10.0, chunks=((10.5, 1), (10.7, 2), (11.0, 1)), done=11.25)
    assert trace.tokens == 4
    assert trace.ttft_s == pytest.approx(0.5)
    assert trace.gaps_s == pytest.approx([0.2, 0.3])
    assert trace.tpot_s == pytest.approx(0.5 / 3)
    assert trace.e2e_s == pytest.approx(1.25)
    assert Trace(1, 0.0, (), 1.0).ttft_s is None


def test_percentiles_interpolate_linearly() -> None:
    assert percentiles([float(v) for v in range(1, 101)]) == {"p50": 50.5, "p99": 99.01}
    assert percentiles([0.25]) == {"p50": 0.25, "p99": 0.25}
    assert percentiles([]) == {}


def test_a_finish_other_than_length_fails_the_request() -> None:
    item = WorkItem("r", (), max_new_tokens=4)
    usage = pb.Usage(generated_tokens=4)
    check_finish(item, pb.Finish(reason=pb.FINISH_REASON_LENGTH, usage=usage))
    with pytest.raises(BenchmarkError, match="FINISH_REASON_EOS"):
        check_finish(item, pb.Finish(reason=pb.FINISH_REASON_EOS, usage=usage))
    with pytest.raises(BenchmarkError, match="3 tokens generated"):
        check_finish(
            item, pb.Finish(reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(generated_tokens=3))
        )
    with pytest.raises(BenchmarkError, match="without a finish"):
        check_finish(item, None)


# -- the HTTP client, on canned answers ---------------------------------------------------------
async def lines_of(text: str) -> AsyncIterator[str]:
    for line in text.split("\n"):
        yield line


async def test_sse_data_joins_an_events_lines_and_stops_at_done() -> None:
    text = ': a comment\ndata: {"a": 1}\n\nevent: x\ndata: one\ndata:two\n\n'
    text += "data: [DONE]\n\ndata: late\n\n"
    assert [d async for d in sse_data(lines_of(text))] == ['{"a": 1}', "one\ntwo"]


def sse(*chunks: dict[str, Any]) -> bytes:
    return (
        b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    )


def token_chunk(count: int) -> dict[str, Any]:
    logprobs = {"content": [{"token": "x", "logprob": 0.0}] * count}
    return {"choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": logprobs}]}


def ending(reason: str, usage: int | None) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
    ]
    if usage is not None:
        chunks.append({"choices": [], "usage": {"completion_tokens": usage}})
    return chunks


def canned(status: int, body: bytes) -> httpx.AsyncClient:
    """A client whose every request gets `body` with `status`; the request bodies are kept."""
    sent: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(status, content=body)

    client = httpx.AsyncClient(base_url="http://bench", transport=httpx.MockTransport(answer))
    client.sent = sent  # type: ignore[attr-defined]
    return client


async def test_the_http_stream_counts_logprob_tokens_and_checks_the_end() -> None:
    item = WorkItem("r", (ChatMessage("user", "hi"),), max_new_tokens=3)
    opening = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    good = sse(opening, token_chunk(1), token_chunk(2), *ending("length", 3))
    async with canned(200, good) as client:
        assert [n async for n in http_stream(client, "m")(item)] == [1, 2]
        assert client.sent == [chat_body(item, "m")]  # type: ignore[attr-defined]
    body = chat_body(item, "m")
    assert (body["max_tokens"], body["ignore_eos"], body["temperature"]) == (3, True, 0)
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["logprobs"] is True
    for status, answer, error in (
        (200, sse(token_chunk(3), *ending("stop", 3)), "ended with stop"),
        (200, sse(token_chunk(3), *ending("length", None)), "usage says no count"),
        (200, sse(token_chunk(2), *ending("length", 2)), "usage says 2 tokens generated"),
        (200, sse(token_chunk(3)), "without a finish"),
        (200, sse(token_chunk(1), {"error": {"message": "boom"}}), "error event.*boom"),
        (400, b'{"error": {"message": "max_tokens is too big"}}', "HTTP 400.*max_tokens"),
    ):
        async with canned(status, answer) as client:
            with pytest.raises(BenchmarkError, match=error):
                async for _ in http_stream(client, "m")(item):
                    pass


# -- the clients, on a fake stream ------------------------------------------------------------
def counting_stream(short: str | None = None) -> tuple[StreamFn, dict[str, Any]]:
    """A stream that answers at once, one token per event; `short` gets one token too few."""
    seen: dict[str, Any] = {"sent": {}, "open": 0, "most_open": 0}

    async def stream(item: WorkItem) -> AsyncIterator[int]:
        seen["sent"][item.id] = time.perf_counter()
        seen["open"] += 1
        seen["most_open"] = max(seen["most_open"], seen["open"])
        for _ in range(item.max_new_tokens - (item.id == short)):
            await asyncio.sleep(0)  # let the other clients run
            yield 1
        seen["open"] -= 1

    return stream, seen


async def test_closed_loop_keeps_exactly_its_clients_busy(workload: Workload) -> None:
    stream, seen = counting_stream()
    result = await run_closed_loop("w1_fake", stream, workload, clients=2, progress=quiet())
    assert seen["most_open"] == 2
    assert (result.requests, result.useful_tokens) == (len(BUDGETS), sum(BUDGETS))
    assert result.details["token_events"] == sum(BUDGETS)
    stream, _ = counting_stream(short="t-3")
    with pytest.raises(BenchmarkError, match="tokens of t-3: got 4, expected 5"):
        await run_closed_loop("w1_fake", stream, workload, clients=2, progress=quiet())


async def test_open_loop_sends_on_schedule_whatever_is_still_running(workload: Workload) -> None:
    all_sent = asyncio.Event()
    sent: dict[str, float] = {}

    async def stream(item: WorkItem) -> AsyncIterator[int]:
        sent[item.id] = time.perf_counter()
        if len(sent) == len(workload.items):
            all_sent.set()
        await all_sent.wait()  # nothing ends before the last request is sent: open loop
        yield item.max_new_tokens

    rate, seed = 100.0, 3
    async with asyncio.timeout(20):
        result = await run_open_loop("w2_fake", stream, workload, rate, seed, quiet())
    arrivals = poisson_arrivals(len(BUDGETS), rate, seed)
    times = [sent[item.id] for item in workload.items]
    for i in range(1, len(times)):  # never early; the offsets follow the schedule
        assert times[i] - times[0] >= arrivals[i] - arrivals[0] - 0.002
    assert result.useful_tokens == sum(BUDGETS)
    assert result.details["target_rate_rps"] == rate
    assert result.details["scheduled_rate_rps"] == pytest.approx(
        observed_rate(len(arrivals), arrivals[-1]), abs=1e-4
    )
    assert result.details["send_lag_s"]["max"] < 1.0
    assert result.details["multi_token_events"] == sum(1 for b in BUDGETS if b > 1)


# -- through a real gRPC server -----------------------------------------------------------
async def test_w1_and_w2_over_grpc_account_for_every_token(
    tiny: LoadedModel, workload: Workload
) -> None:
    settings = GrpcSettings(
        clients=3, max_batch_rows=4, max_seq_len=128, step_token_budget=64, kv_cache_memory=2**20
    )
    served = await start_served(tiny, settings.engine_config())
    seen: list[str] = []
    try:
        w1, w2 = await run_grpc_runs(
            served.channel, workload, settings, tiny.name, quiet(), lambda r: seen.append(r.name)
        )
        metrics = served.metrics()
        with pytest.raises(BenchmarkError, match="INVALID_ARGUMENT"):  # beyond max_seq_len
            too_long = WorkItem("long", workload.items[0].messages, max_new_tokens=1000)
            async for _ in grpc_stream(served.stub)(too_long):
                pass
    finally:
        await served.stop()

    assert seen == ["w1_grpc", "w2_grpc"]
    for run in (w1, w2):
        assert (run.requests, run.useful_tokens) == (len(BUDGETS), sum(BUDGETS))
        assert run.details["token_events"] >= len(BUDGETS)
        assert 0 < run.details["ttft_s"]["p50"] <= run.details["e2e_s"]["p99"]
        assert run.details["itl_s"]["p99"] > 0
    assert w2.details["target_rate_rps"] == pytest.approx(0.7 * w1.requests / w1.wall_s, abs=1e-4)
    # the server generated both runs plus the bench's 2-token warm-up (its own is not counted)
    assert metrics["treadle_generated_tokens_total"] == 2 * sum(BUDGETS) + 2
    assert metrics["treadle_requests_finished_total{reason=length}"] == 2 * len(BUDGETS) + 1


async def test_w1_over_http_accounts_for_every_token(tiny: LoadedModel, workload: Workload) -> None:
    settings = GrpcSettings(
        clients=3, max_batch_rows=4, max_seq_len=128, step_token_budget=64, kv_cache_memory=2**20
    )
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, grace_period=5, http_port=0)
    served = await start_served(tiny, settings.engine_config(), config)
    url = f"http://127.0.0.1:{served.server.http_port}"
    seen: list[str] = []
    try:
        (w1,) = await run_http_runs(
            url,
            served.channel,
            workload,
            settings,
            tiny.name,
            quiet(),
            lambda r: seen.append(r.name),
        )
        metrics = served.metrics()
        async with http_client(url, connections=1) as client:
            with pytest.raises(BenchmarkError, match="HTTP 400"):  # beyond max_seq_len
                too_long = WorkItem("long", workload.items[0].messages, max_new_tokens=1000)
                async for _ in http_stream(client, tiny.name)(too_long):
                    pass
            with pytest.raises(BenchmarkError, match="serves \\['tiny-llama'\\]"):
                await check_http_model(client, "other")
    finally:
        await served.stop()

    assert seen == ["w1_http"]
    assert (w1.requests, w1.useful_tokens) == (len(BUDGETS), sum(BUDGETS))
    # the random model picks special tokens too, which release no text: logprobs count them
    assert w1.details["token_events"] >= len(BUDGETS)
    assert 0 < w1.details["ttft_s"]["p50"] <= w1.details["e2e_s"]["p99"]
    assert w1.details["itl_s"]["p99"] > 0
    # every token came through the HTTP frontend: the run plus the bench's 2-token warm-up
    assert metrics["treadle_generated_tokens_total"] == sum(BUDGETS) + 2
    assert metrics["treadle_frontend_requests_total{frontend=http}"] == len(BUDGETS) + 1


async def test_the_bench_checks_the_model_the_server_serves(
    tiny: LoadedModel, workload: Workload
) -> None:
    settings = GrpcSettings(clients=2, max_batch_rows=4, max_seq_len=128)
    served = await start_served(tiny, settings.engine_config())
    try:
        with pytest.raises(BenchmarkError, match="serves 'tiny-llama'"):
            await run_grpc_runs(served.channel, workload, settings, "other", quiet(), ignore)
        wrong_rows = GrpcSettings(clients=2, max_batch_rows=8, max_seq_len=128)
        with pytest.raises(BenchmarkError, match="runs 4 rows"):
            await run_grpc_runs(served.channel, workload, wrong_rows, tiny.name, quiet(), ignore)
    finally:
        await served.stop()


# -- the server as a process ----------------------------------------------------------------
def test_serve_command_passes_every_engine_setting_and_drops_treadle_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [k for k in os.environ if k.startswith("TREADLE_")]:
        monkeypatch.delenv(key)  # the serve flags' defaults come from TREADLE_* variables
    for config in (
        EngineConfig(max_batch_rows=8, max_seq_len=200, step_token_budget=96),
        EngineConfig(block_size=32, kv_cache_memory=2**20, prefix_cache=False, max_waiting=5),
    ):
        command = serve_command(config, "/m", None)
        assert command[1:4] == ["-m", "treadle.client.cli", "serve"]
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        args = parser.parse_args(command[4:])  # `treadle serve`'s own flags parse it
        assert (args.host, args.port, args.model) == ("127.0.0.1", 0, "/m")
        for name in ENGINE_FLAGS:
            assert getattr(args, name) == getattr(config, name), name
    assert "--no-prefix-cache" in command
    assert args.http_port == -1  # off unless asked for
    assert parser.parse_args(serve_command(config, "/m", None, http=True)[4:]).http_port == 0
    env = server_env({"TREADLE_AUTH_TOKEN": "x", "TREADLE_CACHE_DIR": "/c", "PATH": "/b"}, 3)
    assert env == {
        "TREADLE_CACHE_DIR": "/c",
        "PATH": "/b",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "3",
    }


FAKE_SERVER = """
import signal
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
print("INFO treadle.server: listening on 127.0.0.1:4321 (plaintext)", flush=True)
print("INFO treadle.server: OpenAI-compatible HTTP on 127.0.0.1:4322 (plain HTTP)", flush=True)
signal.sigwait([signal.SIGTERM])
print("bye", flush=True)
"""


async def test_server_process_reads_its_port_and_stops_on_sigterm() -> None:
    log = io.StringIO()
    command = [sys.executable, "-c", FAKE_SERVER]
    server = await start_server(command, {}, Progress(log, interval_s=3600), timeout_s=30)
    assert server.target == "127.0.0.1:4321"
    assert await server.http_url(timeout_s=30) == "http://127.0.0.1:4322"
    assert await server.stop(timeout_s=30) == 0  # it exits 0 only on SIGTERM
    assert "bye" in server.tail()
    assert "server: bye" in log.getvalue()  # its log went to the progress stream


async def test_a_server_that_dies_before_listening_fails_with_its_log() -> None:
    command = [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"]
    with pytest.raises(BenchmarkError, match="no model here"):
        await start_server(command, {}, quiet(), timeout_s=30)


def test_the_whole_run_against_treadle_serve(
    tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "tiny"
    make_tiny_model(tokenizer).model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "results"
    argv = ["--model", str(model_dir), "--workload", str(write_workload(tmp_path, BUDGETS))]
    argv += ["--out", str(out), "--clients", "2", "--max-batch-rows", "4"]
    argv += ["--max-seq-len", "128", "--step-token-budget", "64", "--server-timeout", "120"]
    argv += ["--kv-cache-memory", str(2**20)]

    assert main(argv) == 0

    report = json.loads((out / "grpc-latest.json").read_text())
    stamped = [p.name for p in out.glob("grpc-2*")]
    assert len(stamped) == 2 and {Path(p).suffix for p in stamped} == {".json", ".md"}
    runs = ["w1_inprocess", "w1_grpc", "w2_grpc", "w1_http", "w2_inprocess"]
    assert list(report["runs"]) == runs
    assert all(r["useful_tokens"] == sum(BUDGETS) for r in report["runs"].values())
    assert report["server"]["exit_code"] == 0
    assert report["http_server"]["exit_code"] == 0
    http_port = report["http_server"]["command"].index("--http-port") + 1
    assert report["http_server"]["command"][http_port] == "0"
    server_command = report["server"]["command"]
    assert server_command[server_command.index("--kv-cache-memory") + 1] == str(2**20)
    assert report["settings"]["engine"]["step_token_budget"] == 64
    ratio = (
        report["runs"]["w1_grpc"]["tokens_per_s"] / report["runs"]["w1_inprocess"]["tokens_per_s"]
    )
    # the report keeps 4 decimals
    assert report["ratios"]["w1_grpc/w1_inprocess"] == pytest.approx(ratio, rel=1e-3, abs=1e-4)
    for goal, path in zip(report["goals"], ("grpc", "http"), strict=True):
        assert goal["value"] == report["ratios"][f"w1_{path}/w1_inprocess"]
        assert goal["met"] is (goal["value"] >= 0.9)
    w1_http = report["runs"]["w1_http"]
    assert w1_http["ttft_s"]["p50"] > 0 and w1_http["itl_s"]["p99"] > 0
    w2 = report["runs"]["w2_grpc"]
    assert report["runs"]["w2_inprocess"]["target_rate_rps"] == w2["target_rate_rps"]
    assert report["environment"]["torch_threads"] >= 1
    printed = capsys.readouterr().out
    assert printed == (out / "grpc-latest.md").read_text()
    assert f"| w2_grpc | 5 | {sum(BUDGETS)} |" in printed
    assert "W1 over gRPC >= 0.90x in-process" in printed
    assert "W1 over HTTP >= 0.90x in-process" in printed
    ratio = report["ratios"]["w1_http/w1_inprocess"]
    assert f"| HTTP | {w1_http['tokens_per_s']:.1f} | {ratio:.3f}x |" in printed
