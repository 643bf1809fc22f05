"""The HTTP frontend's lifecycle: a client that leaves cancels its request (in-process, where
the engine's steps can be watched), and SIGTERM drains HTTP like gRPC (a real process whose
steps wait for the test, through the `step_gate` plugin of test_drain.py)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from e2e.openai_server import start_openai_server
from e2e.served import Served, start_served
from e2e.test_drain import GATE_FD, Gate, step_gate
from e2e.test_serve_process import save_tiny_model

from treadle.server.server import ServerConfig
from treadle.worker.loader import LoadedModel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def gate() -> Iterator[Gate]:
    """Steps of requests that enable the `step_gate` plugin wait for the test."""
    with step_gate() as g:
        yield g


LONG = 200  # tokens: far more than the test waits for


@pytest.fixture
async def served_http(tiny: LoadedModel) -> AsyncIterator[Served]:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, grace_period=5, http_port=0)
    s = await start_served(tiny, server_config=config)
    yield s
    await s.stop()


def long_completion(s: Served, stream: bool) -> dict[str, Any]:
    return {
        "model": s.engine.info.model,
        "prompt": [101, 2045, 3310, 77, 19],
        "max_tokens": LONG,
        "ignore_eos": True,
        "logprobs": 0,  # every step makes a chunk
        "stream": stream,
    }


def finished(s: Served, reason: str) -> float:
    return s.metrics().get(f"treadle_requests_finished_total{{reason={reason}}}", 0.0)


async def test_a_stream_whose_client_leaves_frees_its_row(served_http: Served) -> None:
    url = f"http://127.0.0.1:{served_http.server.http_port}/v1/completions"
    body = long_completion(served_http, True)
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", url, json=body) as answer,
    ):
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if line.startswith("data: "):
                break  # one chunk read; leaving the block drops the connection
    await served_http.idle()  # bounded: the row is freed, nothing runs
    assert finished(served_http, "cancelled") == 1
    assert served_http.metrics()["treadle_generated_tokens_total"] < LONG


async def test_a_whole_answer_whose_client_leaves_is_cancelled(served_http: Served) -> None:
    url = f"http://127.0.0.1:{served_http.server.http_port}/v1/completions"
    async with httpx.AsyncClient(timeout=30) as client:
        call = asyncio.ensure_future(client.post(url, json=long_completion(served_http, False)))
        await served_http.until(lambda stats: stats.running == 1)
        call.cancel()  # the client gives up: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await call
    await served_http.idle()
    assert finished(served_http, "cancelled") == 1
    assert served_http.metrics()["treadle_generated_tokens_total"] < LONG


def test_sigterm_drains_http_like_grpc(tmp_path: Path, tokenizer: Any, gate: Gate) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    server = start_openai_server(
        model_dir,
        *("--grace-period", "60", "--plugin", "step_gate=e2e.test_drain:StepGate"),
        env={"PYTHONPATH": str(REPO / "tests"), GATE_FD: str(gate.read_fd)},
        pass_fds=(gate.read_fd,),
    )
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
            stream = iter(
                client.chat.completions.create(
                    model=server.model,
                    messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=3,
                    stream=True,
                    extra_body={"ignore_eos": True, "plugins": [{"name": "step_gate"}]},
                )
            )
            assert next(stream).choices[0].delta.role == "assistant"  # queued, held by the gate
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for(r"draining: 1 requests in flight")
            ready = httpx.get(f"{server.root}/ready", timeout=10)
            assert ready.status_code == 503 and ready.json() == {"status": "NOT_SERVING"}
            with pytest.raises(openai.InternalServerError) as refused:
                client.chat.completions.create(
                    model=server.model, messages=[{"role": "user", "content": "Hi"}]
                )
            assert refused.value.status_code == 503
            assert refused.value.response.headers["retry-after"] == "1"
            gate.open()  # the request in flight runs to its end within the grace period
            reasons = [c.choices[0].finish_reason for c in stream if c.choices]
            assert reasons[-1] == "length"
        assert server.proc.wait(60) == 0
    finally:
        server.kill()
