"""`treadle serve` as a process: it starts, becomes SERVING, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e.served import greedy, read_rest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import make_tiny_model

from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

PROMPT = [101, 2045, 3310, 77, 19]


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tokenizer: Any) -> Path:
    loaded = make_tiny_model(tokenizer)
    loaded.model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


SERVE = [sys.executable, "-m", "treadle.client.cli", "serve"]


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `treadle serve` on loopback with metrics off, to completion (bounded)."""
    command = [*SERVE, "--host", "127.0.0.1", "--metrics-port", "-1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


async def start_process(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    """Start `treadle serve`; return it and its gRPC port, read from its log."""
    proc = await asyncio.create_subprocess_exec(
        *SERVE,
        *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    async with asyncio.timeout(120):
        while line := (await proc.stderr.readline()).decode():
            if found := re.search(r"listening on [\d.]+:(\d+)", line):
                return proc, int(found.group(1))
    raise AssertionError("the server never said where it listens")


async def wait_serving(channel: grpc.aio.Channel) -> None:
    """Follow the health Watch stream until SERVING (no polling)."""
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(120):
        async for update in health.Watch(health_pb2.HealthCheckRequest(service="")):
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                return


async def test_sigterm_lets_requests_in_flight_finish_and_exits_0(tiny_model_dir: Path) -> None:
    proc, port = await start_process(
        "--model",
        str(tiny_model_dir),
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--host",
        "127.0.0.1",
        "--grace-period",
        "60",
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(channel)
            stub = pb_grpc.GenerationStub(channel)
            calls = [stub.GenerateStream(greedy(PROMPT, 60)) for _ in range(3)]
            for call in calls:
                assert (await call.read()).HasField("token")  # all three are running
            proc.send_signal(signal.SIGTERM)
            for call in calls:
                events = await read_rest(call)
                assert events[-1].finish.reason == pb.FINISH_REASON_LENGTH
                assert events[-1].finish.usage.generated_tokens == 60
            with pytest.raises(grpc.aio.AioRpcError) as info:  # draining: no new work
                await stub.Generate(greedy(PROMPT, 2), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        async with asyncio.timeout(60):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_port_taken_and_missing_model_give_clear_errors(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        taken = run_serve("--port", str(port), "--model", str(tmp_path))
    finally:
        blocker.close()
    assert taken.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr

    missing = run_serve("--port", "0", "--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert "neither a model folder nor a .gguf file" in missing.stderr


async def test_sigterm_answers_every_new_call_unavailable_until_the_process_exits(
    tiny_model_dir: Path,
) -> None:
    """Lame duck: from SIGTERM to exit every new call gets UNAVAILABLE, never CANCELLED."""
    proc, port = await start_process(
        "--model",
        str(tiny_model_dir),
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--host",
        "127.0.0.1",
        "--grace-period",
        "60",
    )
    codes: collections.Counter[str] = collections.Counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(channel)
            stub = pb_grpc.GenerationStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            running = stub.GenerateStream(greedy(PROMPT, 200))
            assert (await running.read()).HasField("token")
            rest = asyncio.ensure_future(read_rest(running))
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                await asyncio.gather(*(keep_calling(proc, stub, health, codes) for _ in range(8)))
                events = await rest
                assert await proc.wait() == 0
        print(codes)
        assert events[-1].finish.reason == pb.FINISH_REASON_LENGTH
        assert set(codes) <= {"UNAVAILABLE", "health NOT_SERVING", "health UNAVAILABLE"}, codes
        assert codes["UNAVAILABLE"] > 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def keep_calling(
    proc: asyncio.subprocess.Process,
    stub: pb_grpc.GenerationStub,
    health: health_pb2_grpc.HealthStub,
    codes: collections.Counter[str],
) -> None:
    """Send Generate and health calls one after another until `proc` has exited."""
    while proc.returncode is None:
        try:
            await stub.Generate(greedy(PROMPT, 2), timeout=10)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
        try:
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status
            codes[f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[f"health {exc.code().name}"] += 1


def test_a_dead_step_thread_ends_the_process_with_70(tiny_model_dir: Path) -> None:
    """The engine's step thread dies at its first step (patched here, in the test's launcher)."""
    launcher = (
        "import sys\n"
        "from treadle.scheduler.engine import Engine\n"
        "class Killed(BaseException): pass\n"
        "def die(self): raise Killed('injected by the test')\n"
        "Engine._step = die\n"
        "from treadle.client.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    command = [sys.executable, "-c", launcher, "serve", "--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(
        [*command, "--metrics-port", "-1", "--model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 70, done.stderr
    assert "the engine failed: exiting with 70" in done.stderr
