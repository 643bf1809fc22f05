"""`treadle generate`, `chat`, `info` and `health` driven as a user would, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from e2e.served import Served, not_serving_health, start_served
from helpers import Exploding, Throttle
from tls_certs import make_tls

from treadle.client import AsyncClient
from treadle.scheduler.engine import EngineConfig
from treadle.worker.loader import LoadedModel
from treadle.worker.plugins import default_registry

CLI = [sys.executable, "-m", "treadle.client.cli"]


def env_for(served: Served) -> dict[str, str]:
    return {**os.environ, "TREADLE_TARGET": served.target, "PYTHONUNBUFFERED": "1"}


async def run_cli(served: Served, *args: str, stdin: str = "") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env=env_for(served),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_generate_streams_the_answer(served: Served) -> None:
    async with AsyncClient(served.target) as client:
        want = await client.generate(
            "Hello there", max_new_tokens=12, ignore_eos=True, seed=3, temperature=0.9
        )
    code, out, err = await run_cli(
        served,
        "generate",
        "Hello there",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--seed",
        "3",
        "--temperature",
        "0.9",
    )
    assert code == 0, err
    assert out == want.text + "\n"
    assert "[length] 12 tokens" in err


async def test_generate_reports_bad_input_and_reads_stdin(served: Served) -> None:
    code, _, err = await run_cli(served, "generate", "hi", "--top-p", "2")
    assert code == 1 and "top_p: must be within (0.0, 1.0]" in err
    code, out, err = await run_cli(
        served, "generate", "-", "--max-new-tokens", "3", stdin="from stdin"
    )
    assert code == 0 and "[length] 3 tokens" in err and out.strip()


async def test_a_failed_request_fails_the_command(tiny: LoadedModel) -> None:
    plugins = default_registry()
    plugins.register("explode", Exploding())
    served = await start_served(tiny, plugins=plugins)
    try:
        code, out, err = await run_cli(served, "generate", "hi", "--plugin", "explode")
        assert code == 1 and "plugin 'explode' failed (error id" in err and out == ""
        code, out, err = await run_cli(served, "chat", "--plugin", "explode", stdin="hi\n")
        assert (
            code == 1 and "[error: " in err and "plugin 'explode' failed" in err
        )  # a failure fails the chat
        assert out.count("> ") == 2  # the question failed; the chat went on
        assert "Task was destroyed" not in err and "Traceback" not in err
    finally:
        await served.stop()


async def test_bad_flag_values_are_named_by_argparse(served: Served) -> None:
    for verb in (["generate", "x"], ["chat"]):
        code, _, err = await run_cli(served, *verb, "--logit-bias", "7:1")
        assert code == 2 and "--logit-bias" in err and "Traceback" not in err


async def test_info_and_health(served: Served) -> None:
    code, out, _ = await run_cli(served, "info")
    assert code == 0 and "model: tiny-llama" in out and "max_total_tokens: 256" in out
    assert "(" not in out and "plugins: " in out  # plain values, no Python tuples
    code, out, _ = await run_cli(served, "health")
    assert code == 0 and out.strip() == "SERVING"


async def read_until(
    stream: asyncio.StreamReader, marker: bytes, seen: bytearray, count: int = 1
) -> None:
    """Read into `seen` until `marker` appears `count` times in all (bounded)."""
    async with asyncio.timeout(60):
        while seen.count(marker) < count:
            chunk = await stream.read(256)
            assert chunk, f"output ended before {marker!r}: {seen.decode(errors='replace')}"
            seen.extend(chunk)


async def test_chat_keeps_the_conversation_and_ctrl_c_stops_only_the_answer(
    tiny: LoadedModel,
) -> None:
    # The second answer is held after a few tokens (the throttle plugin) until Ctrl-C was
    # handled, so the interrupt always lands mid-answer.
    throttle = Throttle()
    plugins = default_registry()
    plugins.register("throttle", throttle)
    served = await start_served(
        tiny, EngineConfig(max_batch_rows=4, max_seq_len=512), plugins=plugins
    )
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "chat",
        "--max-new-tokens",
        "150",
        "--ignore-eos",
        "--plugin",
        "throttle",
        env=env_for(served),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # started as a shell without job control starts background commands: SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.stdin and proc.stdout
    out = bytearray()
    try:
        await read_until(proc.stdout, b"> ", out)
        proc.stdin.write(b"Tell me everything.\n")
        await proc.stdin.drain()
        await read_until(proc.stdout, b"> ", out, 2)  # the whole first answer, then a prompt
        first_answer = out.decode().split("> ")[1]
        assert len(first_answer.strip()) > 20

        throttle.free = 12  # the prefill and a few tokens, then the answer waits
        proc.stdin.write(b"And again, at length.\n")
        await proc.stdin.drain()
        mark = len(out)
        while len(out) < mark + 5:  # some of the second answer has streamed
            out.extend(await asyncio.wait_for(proc.stdout.read(64), 60))
        assert await asyncio.to_thread(throttle.holding.wait, 60)  # and the rest waits
        proc.send_signal(signal.SIGINT)  # Ctrl-C: stop this answer, stay in the chat
        try:
            await read_until(proc.stdout, b"[stopped]", out)
        except TimeoutError as exc:  # say what the CLI was doing
            proc.kill()
            err = await asyncio.wait_for(proc.stderr.read(), 30)
            raise AssertionError(f"no [stopped]; the CLI's stderr: {err.decode()[-4000:]}") from exc
        throttle.release.set()  # the held step ends; the cancelled request leaves
        await read_until(proc.stdout, b"> ", out, 3)

        proc.stdin.write(b"Short question?\n")
        await proc.stdin.drain()
        proc.stdin.close()  # Ctrl-D after it
        rest, err = await asyncio.wait_for(proc.communicate(), 60)
        out.extend(rest)
        assert proc.returncode == 0, err.decode()
    finally:
        throttle.release.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await served.stop()
    text = out.decode()
    assert text.count("[stopped]") == 1
    third = text.split("[stopped]")[1].split("> ")[-2]  # the answer after the stop
    assert len(third.strip()) > 20


async def test_error_paths_exit_non_zero_without_asyncio_warnings(served: Served) -> None:
    code, out, err = await run_cli(served, "generate", "x", "--temperature", "-1")
    assert code == 1 and out == "" and "temperature: must be within" in err
    code, _, err2 = await run_cli(served, "generate", "x", "--stop", "")
    assert code == 1 and "stop[0]" in err2
    for text in (err, err2):
        assert "Task was destroyed" not in text and "Traceback" not in text


async def test_json_and_logprobs_are_readable(served: Served) -> None:
    code, out, err = await run_cli(served, "generate", "hi", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["finish"]["reason"] == "length"
    code, out, err = await run_cli(
        served, "generate", "hi", "--max-new-tokens", "3", "--logprobs", "--top-logprobs", "2"
    )
    assert code == 0, err
    lines = [line for line in err.splitlines() if "  top " in line]
    assert len(lines) == 3 and all(line.count(":") >= 2 for line in lines)


async def test_a_client_cert_without_its_key_is_a_usage_error(
    served: Served, tmp_path: Path
) -> None:
    tls = make_tls(tmp_path)
    (tmp_path / "client.pem").write_bytes(tls.client.cert)
    ca, cert = str(tmp_path / "ca.pem"), str(tmp_path / "client.pem")
    code, _, err = await run_cli(served, "health", "--tls-ca", ca, "--tls-cert", cert)
    assert code == 2 and "--tls-key" in err  # argparse's error, not SIGABRT in gRPC core


async def test_health_prints_not_serving() -> None:
    async with not_serving_health() as target:  # loading or draining
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            "health",
            "--target",
            target,
            "--timeout",
            "10",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1 and out.decode().strip() == "NOT_SERVING"
