"""Every example of docs/client.md runs against a real server (on the tiny model)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest
from e2e.served import Served
from tls_certs import make_tls

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def examples() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(DOC.read_text())]


async def run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def test_the_page_has_examples() -> None:
    kinds = [kind for kind, _ in examples()]
    assert kinds.count("python") >= 8 and kinds.count("bash") == 1


@pytest.mark.parametrize("index", range(len(examples())))
async def test_example_runs(index: int, served: Served, tmp_path: Path) -> None:
    kind, code = examples()[index]
    tls = make_tls(tmp_path)  # files the TLS example names
    (tmp_path / "client.pem").write_bytes(tls.client.cert)
    (tmp_path / "client.key").write_bytes(tls.client.key)
    env = {**os.environ, "TREADLE_TARGET": served.target, "PYTHONUNBUFFERED": "1"}
    if kind == "python":
        source = code.replace("localhost:50051", served.target)
        code_, out, err = await run([sys.executable, "-c", source], tmp_path, env)
        assert code_ == 0, err
        assert out.strip(), "the example printed nothing"
        return
    for line in code.strip().splitlines():
        argv = [sys.executable, "-m", "treadle.client.cli", *_split(line.removeprefix("treadle "))]
        code_, out, err = await run(argv, tmp_path, env)
        assert code_ == 0, f"{line}: {err}"
        assert out.strip(), line


def _split(line: str) -> list[str]:
    import shlex

    return shlex.split(line)
