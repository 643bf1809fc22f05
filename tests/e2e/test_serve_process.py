"""`treadle serve` as a process: start failures and exit codes; helpers to run it."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import make_tiny_model

PROMPT = [101, 2045, 3310, 77, 19]


def save_tiny_model(folder: Path, tokenizer: Any) -> Path:
    """Save a tiny random model with `tokenizer` as a model folder `folder`; return it."""
    loaded = make_tiny_model(tokenizer)
    loaded.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tokenizer: Any) -> Path:
    return save_tiny_model(tmp_path / "tiny", tokenizer)


SERVE = [sys.executable, "-m", "treadle.client.cli", "serve"]


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `treadle serve` on loopback with metrics off, to completion (bounded)."""
    command = [*SERVE, "--host", "127.0.0.1", "--metrics-port", "-1", "--http-port", "-1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@dataclass
class ServeProcess:
    """A running `treadle serve` process; its log is read on as it is written."""

    proc: asyncio.subprocess.Process
    port: int
    log: list[str]  # the lines of its stderr read so far
    reader: asyncio.Task[None]  # reads the rest of stderr, so the pipe never fills

    async def exit_code(self, timeout: float = 60) -> int:
        """Wait (bounded) until the process has ended; its exit code."""
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self.reader
        return code

    async def kill(self) -> None:
        """End the process if it still runs (test clean-up)."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()


async def start_process(
    *args: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
) -> ServeProcess:
    """Start `treadle serve` with `env` added to its environment and `pass_fds` inherited;
    return once its log says where it listens."""
    proc = await asyncio.create_subprocess_exec(
        *SERVE,
        *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        pass_fds=pass_fds,
    )
    stderr = proc.stderr
    assert stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(120):
            while line := (await stderr.readline()).decode():
                log.append(line)
                if found := re.search(r"listening on [\d.]+:(\d+)", line):
                    break
            else:
                raise AssertionError(f"the server never said where it listens: {log}")
    except BaseException:
        proc.kill()
        await proc.wait()
        raise

    async def read_on() -> None:
        while line := (await stderr.readline()).decode():
            log.append(line)

    return ServeProcess(proc, int(found.group(1)), log, asyncio.ensure_future(read_on()))


async def wait_health(channel: grpc.aio.Channel, status: int) -> None:
    """Follow the health Watch stream until it reports `status` (no polling)."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        async with asyncio.timeout(120):
            async for update in watch:
                if update.status == status:
                    return
    finally:
        watch.cancel()  # an open call would hold up a drain (it waits for the calls open)


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


def test_a_priority_step_that_is_not_positive_is_a_usage_error() -> None:
    bad = run_serve("--priority-step", "0")
    assert bad.returncode == 2
    assert "--priority-step: must be a positive number of seconds" in bad.stderr


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
        [*command, "--metrics-port", "-1", "--http-port", "-1", "--model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 70, done.stderr
    assert "the engine failed: exiting with 70" in done.stderr
