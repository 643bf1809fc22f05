"""Drain of a real `treadle serve` process, step by step (issue 8 B).

The tests decide when the engine may take each step of a request: the
`step_gate` plugin below (loaded with `--plugin`) makes every step of a
request that enables it wait for one byte on a pipe the test writes to. So a
request is known to be mid-flight while the test checks what the draining
server answers; no timing is assumed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from e2e.served import greedy, read_rest
from e2e.test_serve_process import ServeProcess, save_tiny_model, start_process, wait_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc
from treadle.worker.plugins.base import LogitsPlugin, PluginContext

if TYPE_CHECKING:
    import torch

    from treadle.worker.plan import RowInput

PROMPT = [101, 2045, 3310, 77, 19]
GATE_FD = "TREADLE_TEST_STEP_GATE_FD"  # the read end of the gate's pipe, in the server process
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
TIMEOUT = 10  # seconds, for each call the tests make


class StepGate(LogitsPlugin):
    """Runs in the server: each step of a request that enables it first reads one byte
    from the pipe at fd $TREADLE_TEST_STEP_GATE_FD (blocking the step thread until the
    test writes it); once the test closes its end, every step runs at once."""

    name = "step_gate"

    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> object:
        return None

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        os.read(int(os.environ[GATE_FD]), 1)  # b"" once the test closed its end
        return scores


@dataclass
class Gate:
    """The test's end of the step gate."""

    read_fd: int  # handed to the server process
    write_fd: int | None

    def allow(self, steps: int) -> None:
        """Let `steps` more gated steps run."""
        assert self.write_fd is not None
        os.write(self.write_fd, b"s" * steps)

    def open(self) -> None:
        """Let every gated step run from now on."""
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer: Any) -> Path:
    return save_tiny_model(tmp_path / "tiny", tokenizer)


@contextlib.contextmanager
def step_gate() -> Iterator[Gate]:
    """A step gate for a server process to inherit; opened and closed on the way out."""
    read_fd, write_fd = os.pipe()
    gate = Gate(read_fd, write_fd)
    try:
        yield gate
    finally:
        gate.open()
        os.close(read_fd)


@pytest.fixture
def gate() -> Iterator[Gate]:
    with step_gate() as g:
        yield g


async def start_gated(model_dir: Path, gate: Gate, *args: str) -> ServeProcess:
    """`treadle serve` on loopback with the step gate, a 60 s grace period and `args`."""
    tests_dir = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    return await start_process(
        *("--model", str(model_dir), "--host", "127.0.0.1", "--port", "0"),
        *("--metrics-port", "-1", "--http-port", "-1", "--grace-period", "60"),
        *("--plugin", "step_gate=e2e.test_drain:StepGate", *args),
        env={"PYTHONPATH": path, GATE_FD: str(gate.read_fd)},
        pass_fds=(gate.read_fd,),
    )


def gated(max_new: int, request_id: str = "") -> pb.GenerateRequest:
    """A greedy request whose steps wait for the gate."""
    return greedy(PROMPT, max_new, request_id, plugins=[pb.Plugin(name="step_gate")])


async def open_session(stub: pb_grpc.GenerationStub) -> Any:
    """A Session whose handler is known to run on the server (it answered an item)."""
    session = stub.Session()
    await session.write(pb.SessionRequest(generate=greedy(PROMPT, 2)))  # no id: refused
    answer = await session.read()
    assert answer.finish.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer
    return session


async def assert_new_calls_unavailable(channel: grpc.aio.Channel, session: Any) -> None:
    """Every kind of new call, and a new item on the open `session`, gets UNAVAILABLE."""
    stub = pb_grpc.GenerationStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert checked.status == NOT_SERVING
    for call in (
        stub.Generate(greedy(PROMPT, 2), timeout=TIMEOUT),
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT),
        stub.GenerateStream(greedy(PROMPT, 2), timeout=TIMEOUT).read(),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == UNAVAILABLE, refused.value

    await session.write(pb.SessionRequest(generate=greedy(PROMPT, 2, "late")))
    late = await session.read()
    assert (late.request_id, late.finish.error.code) == ("late", UNAVAILABLE.value[0]), late

    new_session = stub.Session(timeout=TIMEOUT)
    await new_session.write(pb.SessionRequest(generate=greedy(PROMPT, 2, "new")))
    await new_session.done_writing()
    events = await read_rest(new_session)
    assert [(e.request_id, e.finish.error.code) for e in events] == [
        ("new", UNAVAILABLE.value[0])
    ], events


async def test_every_new_call_is_unavailable_from_sigterm_until_the_process_exits(
    model_dir: Path, gate: Gate
) -> None:
    """New calls while a request runs, and after it ended while an open Session keeps
    the process up, all get UNAVAILABLE; the process exits 0 once the Session ends."""
    server = await start_gated(model_dir, gate)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await wait_health(channel, SERVING)
            stub = pb_grpc.GenerationStub(channel)
            session = await open_session(stub)  # open at SIGTERM: the lame duck waits for it
            running = stub.GenerateStream(gated(8))
            gate.allow(1)
            assert (await running.read()).HasField("token")  # its next step waits for the gate
            server.proc.send_signal(signal.SIGTERM)
            await wait_health(channel, NOT_SERVING)

            await assert_new_calls_unavailable(channel, session)  # `running` is mid-flight

            gate.open()
            finish = (await read_rest(running))[-1].finish
            assert finish.reason == pb.FINISH_REASON_LENGTH
            assert finish.usage.generated_tokens == 8

            await assert_new_calls_unavailable(channel, session)  # idle, but still up
            assert server.proc.returncode is None

            await session.done_writing()
            assert await read_rest(session) == []
            assert await session.code() == grpc.StatusCode.OK
        assert await server.exit_code() == 0, "".join(server.log)
        assert any("drained" in line for line in server.log)
    finally:
        await server.kill()


async def test_requests_running_or_queued_at_sigterm_finish_within_the_grace_period(
    model_dir: Path, gate: Gate
) -> None:
    """One row: at SIGTERM one request is mid-flight (held at the gate) and another, just
    accepted, waits for the row; both run to their length, then the process exits 0."""
    server = await start_gated(model_dir, gate, "--max-batch-rows", "1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await wait_health(channel, SERVING)
            stub = pb_grpc.GenerationStub(channel)
            running = stub.GenerateStream(gated(6))
            gate.allow(1)
            assert (await running.read()).HasField("token")  # it holds the only row
            session = await open_session(stub)
            await session.write(pb.SessionRequest(generate=greedy(PROMPT, 5, "queued")))
            # Items are handled in order: this refusal means "queued" was accepted before it.
            await session.write(pb.SessionRequest(generate=greedy(PROMPT, 2)))
            probe = await session.read()
            assert probe.finish.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], probe
            server.proc.send_signal(signal.SIGTERM)
            await wait_health(channel, NOT_SERVING)

            gate.open()
            first = (await read_rest(running))[-1].finish
            assert (first.reason, first.usage.generated_tokens) == (pb.FINISH_REASON_LENGTH, 6)
            await session.done_writing()
            events = await read_rest(session)
            assert {e.request_id for e in events} == {"queued"}, events
            second = events[-1].finish
            assert (second.reason, second.usage.generated_tokens) == (pb.FINISH_REASON_LENGTH, 5)
            assert await session.code() == grpc.StatusCode.OK
        assert await server.exit_code() == 0, "".join(server.log)
    finally:
        await server.kill()
