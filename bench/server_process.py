"""`treadle serve` as a subprocess of the benchmark: start it, learn its ports, stop it.

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
HTTP = re.compile(r"OpenAI-compatible HTTP on \S+:(\d+)")
KEPT_ENV = ("TREADLE_CACHE_DIR",)  # the only TREADLE_* variable the server inherits


def serve_command(
    config: EngineConfig,
    model: str | None,
    device: str | None,
    host: str = "127.0.0.1",
    http: bool = False,
) -> list[str]:
    """The `treadle serve` command line for `config`, on a free port of `host`.

    gRPC and /metrics listen on free ports; the OpenAI-compatible HTTP
    frontend too with `http` (`--http-port 0`), else it is off (`-1`).

    Every engine setting is passed as a flag, so the server runs the engine
    the in-process runs use whatever TREADLE_* defaults the environment has
    (`server_env` drops them too); a setting left None (max_seq_len,
    kv_cache_memory) is left out, and the server's default is the engine's.
    """
    command = [sys.executable, "-m", "treadle.client.cli", "serve"]
    command += ["--host", host, "--port", "0", "--metrics-port", "0"]
    command += ["--http-port", "0" if http else "-1"]
    command += ["--log-level", "INFO"]
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
    http_port: asyncio.Future[int] = field(default_factory=asyncio.Future)  # from its log
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    reader: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port.result()}"

    async def http_url(self, timeout_s: float) -> str:
        """The HTTP frontend's base URL, once its log line came (at most `timeout_s`).

        Raises BenchmarkError if the server exits first or does not say so in
        time (started with `--http-port -1`, it never does).
        """
        port = await self.guard(asyncio.shield(self.http_port), timeout_s, "before HTTP listened")
        return f"http://127.0.0.1:{port}"

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
            for pattern, future, _ in self._ports():
                if not future.done() and (found := pattern.search(line)):
                    future.set_result(int(found.group(1)))
        for _, future, what in self._ports():
            if not future.done():
                future.set_exception(BenchmarkError(f"the server never {what}{self.tail()}"))
                future.exception()  # marks it seen: a port nobody asked for is no error

    def _ports(self) -> tuple[tuple[re.Pattern[str], asyncio.Future[int], str], ...]:
        """Each port the log tells: its line, its future, and what it means in an error."""
        return (
            (LISTENING, self.port, "listened"),
            (METRICS, self.metrics_port, "served /metrics"),
            (HTTP, self.http_port, "served HTTP"),
        )


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
