"""Operations: engine death, warm-up not counted, stream cap, TLS files, metrics host, token."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import pytest
import torch
from e2e.served import Served, greedy, start_served
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_certs import make_tls

from treadle.server.metrics import ServerMetrics
from treadle.server.serve_cli import add_serve_arguments
from treadle.server.serve_main import _server_config
from treadle.server.server import ServerConfig, ServerStartError, TreadleServer
from treadle.v1 import treadle_pb2 as pb
from treadle.worker.loader import LoadedModel

PROMPT = [101, 2045, 3310, 77, 19]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _StepThreadKilled(BaseException):
    """Not an Exception: the step loop's own recovery lets it through, so the thread dies."""


async def test_a_dead_step_thread_turns_health_not_serving(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def die() -> None:
        raise _StepThreadKilled("injected")

    monkeypatch.setattr(served.engine, "_step", die)
    health = health_pb2_grpc.HealthStub(served.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    result = await served.stub.Generate(greedy(PROMPT, 4))  # the request that hits the fault
    assert result.finish.reason == pb.FINISH_REASON_ERROR
    async with asyncio.timeout(10):
        assert (await watch.read()).status == NOT_SERVING
        await served.server.failed.wait()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Generate(greedy(PROMPT, 2))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_warm_up_request_is_not_counted(served: Served) -> None:
    metrics = served.metrics()
    assert metrics.get("treadle_generated_tokens_total", 0.0) == 0
    assert not any(k.startswith("treadle_requests_finished_total") for k in metrics)
    assert metrics["treadle_request_latency_seconds_count"] == 0
    await served.stub.Generate(greedy(PROMPT, 3))
    await served.idle()
    metrics = served.metrics()
    assert metrics["treadle_generated_tokens_total"] == 3
    assert metrics["treadle_requests_finished_total{reason=length}"] == 1


async def test_calls_beyond_max_concurrent_streams_wait_for_a_free_stream(
    tiny: LoadedModel,
) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, max_concurrent_streams=1)
    s = await start_served(tiny, server_config=config)
    try:
        await s.stub.Generate(greedy(PROMPT, 2))  # the one stream is free
        session = s.stub.Session()  # holds the connection's only stream while open
        await session.write(pb.SessionRequest(generate=greedy(PROMPT, 2, request_id="a")))
        while not (await session.read()).HasField("finish"):
            pass
        waiting = asyncio.ensure_future(s.stub.Generate(greedy(PROMPT, 2), timeout=30))
        with pytest.raises(grpc.aio.AioRpcError) as info:  # queued in the client meanwhile
            await s.stub.Generate(greedy(PROMPT, 2), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not waiting.done()
        await session.done_writing()
        assert await session.read() is grpc.aio.EOF
        assert len((await waiting).token_ids) == 2  # runs once the session's stream ended
    finally:
        await s.stop()


@pytest.mark.parametrize("swap", ["cert", "key", "client_ca"])
async def test_tls_files_of_the_wrong_kind_name_the_flag(tmp_path: Path, swap: str) -> None:
    tls = make_tls(tmp_path)
    files = {"cert": tls.server_cert, "key": tls.server_key, "client_ca": tls.client_ca}
    files[swap] = tls.server_key if swap != "key" else tls.server_cert
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        tls_cert=files["cert"],
        tls_key=files["key"],
        tls_client_ca=files["client_ca"],
    )
    with pytest.raises(ServerStartError) as info:
        await TreadleServer(config, "tiny").start()
    flag = {"cert": "--tls-cert", "key": "--tls-key", "client_ca": "--tls-client-ca"}[swap]
    assert str(info.value).startswith(f"{flag}: {files[swap]} is not a")
    assert "swapped" in str(info.value)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_metrics_host_defaults_to_host_and_the_env_token_is_stripped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TREADLE_AUTH_TOKEN", "  s3cret\n")
    config = _server_config(_args("--host", "127.0.0.1"))
    assert config.metrics_host == "127.0.0.1"
    assert config.auth_token == "s3cret"
    config = _server_config(_args("--host", "127.0.0.1", "--metrics-host", "0.0.0.0"))
    assert config.metrics_host == "0.0.0.0"
    assert _server_config(_args("--max-concurrent-streams", "0")).max_concurrent_streams is None


async def test_metrics_bind_the_given_host_and_the_log_says_what_callers_need(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ServerConfig(
        host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, auth_token="t"
    )
    server = TreadleServer(config, "tiny")
    with caplog.at_level(logging.INFO, logger="treadle.server"):
        await server.start()
    try:
        assert server._metrics_http.server_address[0] == "127.0.0.1"
        assert "(plaintext, bearer token required)" in caplog.text
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any("TLS is off" in r.getMessage() for r in warnings)
    finally:
        await server.drain()


def test_the_tokens_per_second_window_is_pruned_as_it_is_written() -> None:
    now = [0.0]
    metrics = ServerMetrics("m", clock=lambda: now[0])
    for step in range(1000):  # 1000 s of steps, never scraped
        now[0] = float(step)
        metrics._observe_rate(5)
    assert len(metrics._window) <= 11
    assert metrics._rate() == pytest.approx(5 * 11 / 10)


NOBODY = 65534


def _load_as_nobody(folder: Path, answer: Connection) -> None:
    """In a forked child: become uid/gid 65534, load `folder`, send ("ok", name) or
    ("error", text). Nothing is exec'd, so the interpreter need not be readable by that uid.

    The garbage collector first freezes what the child inherited: objects left over by
    earlier tests (engines, servers) must not be collected here, where a finalizer would
    wait for a thread the fork did not copy (seen: the load hung in such a join)."""
    gc.freeze()
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        torch.set_num_threads(1)  # no OpenMP pool inherited across the fork
        from treadle.worker.loader import load_model

        answer.send(("ok", load_model(str(folder), device="cpu").name))
    except BaseException as e:  # everything goes back to the test, which judges it
        answer.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        answer.close()


def load_as_nobody(folder: Path, timeout: float = 120) -> tuple[str, str]:
    """Load `folder` in a child forked as uid 65534 (bounded: the child is killed past
    `timeout`)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_load_as_nobody, args=(folder, send))
    child.start()
    send.close()
    try:
        assert receive.poll(timeout), "the child sent nothing in time"
        result: tuple[str, str] = receive.recv()
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join(timeout=30)
        receive.close()
    return result


def test_a_converted_folder_loads_as_another_user(tiny: LoadedModel) -> None:
    """G1, as the image does: written by root with a strict umask (0700 folder, 0600 files, as
    the old conversion left them), served by an unprivileged uid: refused until the loader's
    own permission step runs, then loaded."""
    from treadle.worker.loader import _make_readable

    if os.getuid() != 0:
        pytest.skip("needs root to switch users")
    # pytest's tmp_path lies under a 0700 folder that uid 65534 cannot cross: use /tmp itself
    with tempfile.TemporaryDirectory(prefix="treadle-uid-") as scratch:
        Path(scratch).chmod(0o755)
        folder = Path(scratch) / "converted"
        old = os.umask(0o077)
        try:
            folder.mkdir()
            tiny.model.save_pretrained(folder)
            tiny.tokenizer.save_pretrained(folder)
        finally:
            os.umask(old)
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o600}
        status, detail = load_as_nobody(folder)
        assert status == "error" and "Permission denied" in detail, detail
        _make_readable(folder)
        assert load_as_nobody(folder) == ("ok", "converted")
