"""A real `treadle serve` process with its OpenAI-compatible HTTP port, for the HTTP tests.

Every port is picked free (0) and learned from the log; readiness is the log's "serving"
line; every wait is bounded.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

SERVE = [sys.executable, "-m", "treadle.client.cli", "serve"]
START_S = 120  # a start (model load and warm-up) takes seconds; bounded generously


@dataclass
class OpenAIServer:
    """A running `treadle serve`; its stderr is read on a thread as it comes."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str]  # log lines not yet looked at by `wait_for`
    model: str
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    log: list[str] = field(default_factory=list)  # every line seen by `wait_for`

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_for(self, pattern: str, timeout: float = START_S) -> re.Match[str]:
        """The first match of `pattern` in the log lines still to come (bounded)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no log line matched {pattern!r}: {self.log}") from None
            self.log.append(line)
            if found := re.search(pattern, line):
                return found

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (bounded)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def start_openai_server(
    model_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> OpenAIServer:
    """`treadle serve` of `model_dir` on loopback (gRPC, HTTP and metrics on free ports),
    returned once it serves."""
    command = [*SERVE, "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0"]
    command += ["--http-port", "0", "--metrics-port", "0", *args]
    proc = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        pass_fds=pass_fds,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    server = OpenAIServer(proc, lines, model_dir.name)
    try:
        found = server.wait_for(r"listening on [\d.]+:(\d+) .*metrics on [\d.]+:(\d+)")
        server.grpc_port, server.metrics_port = int(found.group(1)), int(found.group(2))
        server.http_port = int(server.wait_for(r"OpenAI-compatible HTTP on [\d.]+:(\d+)").group(1))
        server.wait_for(r"treadle.server: serving ")
    except BaseException:
        server.kill()
        raise
    return server
