"""Property-based fuzzing of the gRPC API: random, mostly invalid requests against a real server.

Messages are built from the proto's own descriptors (tests/proto_fuzz.py), some
from scratch, some as a valid request with random fields merged in. Every
answer must be OK or a documented status code whose message names a field, and
the server must stay SERVING. The suite runs a fixed (derandomized) set of
examples; TREADLE_FUZZ_EXAMPLES raises the count and TREADLE_FUZZ_SEED picks
random ones, for the recorded run:

    TREADLE_FUZZ_EXAMPLES=1000 TREADLE_FUZZ_SEED=1 bash tests/run.sh tests/e2e/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from proto_fuzz import field_names, messages

from treadle.api.limits import RequestLimits
from treadle.scheduler.engine import EngineConfig
from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc
from treadle.worker.loader import LoadedModel

EXAMPLES = int(os.environ.get("TREADLE_FUZZ_EXAMPLES", "120"))
FUZZ_SEED = os.environ.get("TREADLE_FUZZ_SEED")
CALL_TIMEOUT_S = 30.0  # a call still open after this long is a hang: the test fails

FIELDS = field_names(pb.GenerateRequest.DESCRIPTOR) | field_names(pb.SessionRequest.DESCRIPTOR)
NAMES_A_FIELD = re.compile(r"\b(" + "|".join(sorted(FIELDS, key=len, reverse=True)) + r")\b")
REFUSALS = {  # documented refusals (docs/service.md), besides OK
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # the message is too large, or the queue is full
}
NO_POSSIBLE_TOKEN = "no possible next token"  # documented Finish(ERROR) of an over-constrained row
# documented Finish(ERROR) of a row whose grammar failed at run time (docs/structured-output.md)
GRAMMAR_FAILED = "response_format: the grammar refused token"


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=FUZZ_SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def maybe_seeded(test: Any) -> Any:
    return seed(int(FUZZ_SEED))(test) if FUZZ_SEED is not None else test


# ---------------------------------------------------------------- the server, on its own loop


@dataclass
class ThreadedServer:
    """A real server (tiny model) on a loop in another thread, for synchronous clients."""

    target: str
    loop: asyncio.AbstractEventLoop
    served: Any

    def health(self) -> int:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


@pytest.fixture(scope="module")
def fuzz_server(tokenizer: Any) -> Iterator[ThreadedServer]:
    from e2e.served import start_served
    from helpers import make_tiny_model

    tiny: LoadedModel = make_tiny_model(tokenizer)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-server", daemon=True)
    thread.start()
    config = EngineConfig(
        max_batch_rows=8, max_seq_len=64, limits=RequestLimits(default_max_new_tokens=8)
    )
    started: Future[Any] = asyncio.run_coroutine_threadsafe(
        start_served(tiny, engine_config=config), loop
    )
    served = started.result(timeout=120)
    try:
        yield ThreadedServer(f"127.0.0.1:{served.server.port}", loop, served)
    finally:
        asyncio.run_coroutine_threadsafe(served.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def stub(fuzz_server: ThreadedServer) -> Iterator[pb_grpc.GenerationStub]:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield pb_grpc.GenerationStub(channel)


# ---------------------------------------------------------------- what is acceptable


def check_refusal(code: grpc.StatusCode, message: str) -> None:
    assert code in REFUSALS, f"undocumented status {code.name}: {message!r}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert NAMES_A_FIELD.search(message), f"names no field: {message!r}"


def check_finish(finish: pb.Finish) -> None:
    """A Finish is normal, or carries a documented error code whose message says why."""
    assert finish.reason != pb.FINISH_REASON_UNSPECIFIED, finish
    if not finish.HasField("error") or finish.reason == pb.FINISH_REASON_CANCELLED:
        return
    code = next(c for c in grpc.StatusCode if c.value[0] == finish.error.code)
    if code is grpc.StatusCode.INTERNAL:
        message = finish.error.message
        assert NO_POSSIBLE_TOKEN in message or message.startswith(GRAMMAR_FAILED), (
            f"unexpected error finish: {finish}"
        )
    else:
        check_refusal(code, finish.error.message)


# ---------------------------------------------------------------- strategies


def valid_base() -> st.SearchStrategy[pb.GenerateRequest]:
    return st.builds(
        lambda ids, n: pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=ids), stopping=pb.StoppingParameters(max_new_tokens=n)
        ),
        st.lists(st.integers(1, 5000), min_size=1, max_size=6),
        st.integers(1, 6),
    )


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """From scratch (almost always invalid), or a valid request with a few random fields."""
    if draw(st.booleans()):
        return draw(messages(pb.GenerateRequest.DESCRIPTOR))
    base = draw(valid_base())
    base.MergeFrom(draw(messages(pb.GenerateRequest.DESCRIPTOR, set_one_in=6)))
    return base


# ---------------------------------------------------------------- the properties


@maybe_seeded
@fuzz_settings(EXAMPLES)
@given(request=requests())
def test_random_generate_requests_get_documented_answers(
    request: pb.GenerateRequest, stub: pb_grpc.GenerationStub, fuzz_server: ThreadedServer
) -> None:
    try:
        response = stub.Generate(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        check_refusal(err.code(), err.details() or "")
    else:
        check_finish(response.finish)
    assert fuzz_server.health() == health_pb2.HealthCheckResponse.SERVING


@maybe_seeded
@fuzz_settings(max(EXAMPLES // 3, 10))
@given(items=st.lists(messages(pb.SessionRequest.DESCRIPTOR), min_size=1, max_size=4))
def test_random_sessions_end_every_item_and_keep_the_stream(
    items: list[pb.SessionRequest], stub: pb_grpc.GenerationStub, fuzz_server: ThreadedServer
) -> None:
    for item in items:  # open requests must end on their own: small budgets only
        if item.WhichOneof("action") == "generate":
            item.generate.stopping.max_new_tokens = min(item.generate.stopping.max_new_tokens, 6)
    try:
        events = list(stub.Session(iter(items), timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as err:  # the stream itself may only fail for a documented reason
        check_refusal(err.code(), err.details() or "")
    else:
        for event in events:
            if event.WhichOneof("event") == "finish":
                check_finish(event.finish)
    assert fuzz_server.health() == health_pb2.HealthCheckResponse.SERVING
