"""`treadle serve` as a subprocess of the benchmark: start it, learn its port, stop it.

Its log (stdout and stderr together) is read line by line the whole time, so
the pipe never fills; each line goes to the progress stream and the last
ones are kept for error messages.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from treadle.scheduler.engine_config import EngineConfig

from .progress import Progress
from .run_result import BenchmarkError

T = TypeVar("T")

LISTENING = re.compile(r"listening on \S+:(\d+)")
METRICS = re.compile(r"metrics on \S*:(\d+)/metrics")
KEPT_ENV = ("TREADLE_CACHE_DIR",)  # the only TREADLE_* variable the server inherits


def serve_command(
    config: EngineConfig, model: str | None, device: str | None, host: str = "127.0.0.1"
) -> list[str]:
    """The `treadle serve` command line for `config`, on a free port of `host`.

    Every engine setting is passed as a flag, so the server runs the engine
    the in-process runs use whatever TREADLE_* defaults the environment has
    (`server_env` drops them too); a setting left None (max_seq_len,
    kv_cache_memory) is left out, and the server's default is the engine's.
    """
    command = [sys.executable, "-m", "treadle.client.cli", "serve"]
    command += ["--host", host, "--port", "0", "--metrics-port", "0", "--log-level", "INFO"]
    command += ["--max-batch-rows", str(config.max_batch_rows)]
    if config.max_seq_len is not None:
        command += ["--max-seq-len", str(config.max_seq_len)]
    if config.kv_cache_memory is not None:
        command += ["--kv-cache-memory", str(config.kv_cache_memory)]
    command += ["--block-size", str(config.block_size)]
    if config.step_token_budget is not None:
        command += ["--step-token-budget", str(config.step_token_budget)]
    command += ["--prefix-cache" if config.prefix_cache else "--no-prefix-cache"]
    command += ["--max-waiting", str(config.max_waiting)]
    if model is not None:
        command += ["--model", model]
    if device is not None:
        command += ["--device", device]
    return command


def server_env(base: Mapping[str, str], threads: int | None) -> dict[str, str]:
    """`base` without TREADLE_* settings (but the model cache), unbuffered, and `threads`.

    `threads` (torch's intra-op threads) goes through OMP_NUM_THREADS, which
    torch reads at start.
    """
    env = {k: v for k, v in base.items() if not k.startswith("TREADLE_") or k in KEPT_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass
class ServerProcess:
    """A running `treadle serve`; `stop()` ends it."""

    proc: asyncio.subprocess.Process
    progress: Progress
    port: asyncio.Future[int] = field(default_factory=asyncio.Future)  # from its log
    metrics_port: asyncio.Future[int] = field(default_factory=asyncio.Future)  # from its log
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    reader: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port.result()}"

    async def guard(self, aw: Awaitable[T], timeout_s: float | None, what: str) -> T:
        """Await `aw` (at most `timeout_s`; None: no bound).

        Raises BenchmarkError, naming `what`, if it times out or the server
        exits first; `aw` is cancelled then.
        """
        task = asyncio.ensure_future(aw)
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait(
                {task, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exited.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if exited in done:
            await self._log_read(timeout_s=5.0)
            raise BenchmarkError(f"the server exited ({self.proc.returncode}) {what}{self.tail()}")
        raise BenchmarkError(f"the server took over {timeout_s} s {what}{self.tail()}")

    async def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait (bounded) for the exit; returns the exit code.

        Kills it after `timeout_s` and raises BenchmarkError then.
        """
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                code = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise BenchmarkError(
                f"the server did not exit within {timeout_s:.0f} s of SIGTERM{self.tail()}"
            ) from None
        await self._log_read(timeout_s=5.0)
        return code

    def tail(self) -> str:
        """The last log lines, for an error message."""
        return "".join(f"\n  | {line}" for line in self.log_tail)

    async def _log_read(self, timeout_s: float) -> None:
        """Wait (bounded) until the whole log was read: the process has exited."""
        if self.reader is not None:
            await asyncio.wait({self.reader}, timeout=timeout_s)

    async def _read_log(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            line = raw.decode(errors="replace").rstrip()
            self.log_tail.append(line)
            self.progress.say(f"server: {line}")
            if not self.port.done() and (found := LISTENING.search(line)):
                self.port.set_result(int(found.group(1)))
            if not self.metrics_port.done() and (found := METRICS.search(line)):
                self.metrics_port.set_result(int(found.group(1)))
        for future, what in ((self.port, "listened"), (self.metrics_port, "served /metrics")):
            if not future.done():
                future.set_exception(BenchmarkError(f"the server never {what}{self.tail()}"))


async def start_server(
    command: list[str], env: Mapping[str, str], progress: Progress, timeout_s: float
) -> ServerProcess:
    """Start `command` and wait (at most `timeout_s`) until its log says where it listens.

    Raises BenchmarkError (after killing it) if it exits or times out first.
    """
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env),
    )
    server = ServerProcess(proc, progress)
    server.reader = asyncio.ensure_future(server._read_log())
    try:
        await server.guard(asyncio.shield(server.port), timeout_s, "before listening")
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    return server
