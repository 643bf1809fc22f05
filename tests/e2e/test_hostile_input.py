"""Hostile input at the gRPC edge (issue 8, C1-C6, G7, G13): refused cheaply, with
the field named in the message and in `google.rpc.BadRequest`, never UNKNOWN."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from e2e.served import Served, greedy, start_served
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from treadle.api.limits import RequestLimits
from treadle.scheduler.engine import EngineConfig
from treadle.server import service as service_module
from treadle.server.server import ServerConfig, TreadleServer
from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc
from treadle.worker.loader import LoadedModel

PROMPT = [101, 2045, 3310, 77, 19]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status a call ended with (grpcio-status's trailing metadata)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("the call carried no status details")


def violation(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest.FieldViolation:
    bad = error_details_pb2.BadRequest()
    assert [d for d in details(error).details if d.Unpack(bad)], "no BadRequest detail"
    (only,) = bad.field_violations
    return only


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    info = error_details_pb2.RetryInfo()
    assert [d for d in details(error).details if d.Unpack(info)], "no RetryInfo detail"
    return info.retry_delay.ToNanoseconds() / 1e9


async def refused(
    stub: pb_grpc.GenerationStub, request: pb.GenerateRequest
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request, timeout=60)
    return info.value


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = (
    [
        ("request_id", {"request_id": "x" * 257}),  # C1
        ("request_id", {"request_id": "é" * 129}),  # 258 bytes, 129 characters
        ("priority", {"priority": 11}),  # C6
        ("priority", {"priority": -(2**31)}),
        ("bad_words[0]", {"sampling": pb.SamplingParameters(bad_words=["w" * 257])}),  # C3
        (
            "bad_words",
            {
                "sampling": pb.SamplingParameters(
                    bad_words=[f"alpha{i} beta{i} gamma{i} delta{i} eps{i}" for i in range(256)]
                )
            },
        ),
        (
            "logit_bias",
            {"sampling": pb.SamplingParameters(logit_bias={i: 1.0 for i in range(1025)})},
        ),
        ("logit_bias[3]", {"sampling": pb.SamplingParameters(logit_bias={3: float("inf")})}),
        ("plugins", {"plugins": [pb.Plugin(name="phrase_boost")] * 9}),
        ("plugins[0].name", {"plugins": [pb.Plugin(name="nope")]}),  # G13
        ("plugins[0].name", {"plugins": [pb.Plugin(name="x" * 200_000)]}),  # once echoed whole
        ("plugins[0].name", {"plugins": [pb.Plugin(name="é" * 33)]}),  # 66 bytes
    ]
    + [  # client values echoed in the message are shown clipped
        ("plugins[0]", {"plugins": [pb.Plugin(name="phrase_boost", args_json=j)]})
        for j in ('{"' + "k" * 16_000 + '": 1}', '{"phrases": ["a"], "' + "k" * 16_000 + '": 1}')
    ]
    + [
        (
            "plugins[0].bias",
            {
                "plugins": [
                    pb.Plugin(
                        name="phrase_boost",
                        args_json=json.dumps({"phrases": ["a"], "bias": "b" * 16_000}),
                    )
                ]
            },
        ),
    ]
    + [  # C4: what once escaped as UNKNOWN with the exception's text
        ("plugins[0].args_json", {"plugins": [pb.Plugin(name="phrase_boost", args_json=j)]})
        for j in (
            "[" * 100_000 + "]" * 100_000,  # nesting
            '{"bias": ' + "9" * 5000 + "}",  # a 5,000-digit integer
            '{"bias": 1e400}',  # a float out of range
            '{"bias": NaN}',
            '{"bias": -Infinity}',
            '{"phrases": ["' + "a" * 20_000 + '"]}',  # size
            "{",
            '"not an object"',
        )
    ]
    + [  # C3: a phrase of few characters and many tokens
        (
            "plugins[0].phrases",
            {
                "plugins": [
                    pb.Plugin(
                        name="phrase_boost",
                        args_json=json.dumps(
                            {"phrases": [f"{i}" + "é中😀" * 60 for i in range(8)]}
                        ),
                    )
                ]
            },
        ),
    ]
)


async def test_bad_fields_are_invalid_argument_naming_the_field_with_details(
    served: Served,
) -> None:
    for field, request_kw in BAD_FIELDS:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), **request_kw)
        error = await refused(served.stub, request)
        assert error.code() == INVALID, (field, error.details())
        assert error.details().startswith(f"{field}: "), error.details()
        assert len(error.details()) < 600  # never an echo of the hostile input
        assert details(error).ByteSize() < 1500  # message and details stay small
        assert violation(error).field == field
        assert details(error).message == error.details()
    assert served.engine.num_in_flight == 0  # nothing was queued


async def test_inputs_are_named_by_their_wire_names(served: Served) -> None:
    error = await refused(served.stub, pb.GenerateRequest())
    assert error.details() == "input: exactly one of prompt, chat, token_ids must be set"
    for request, field in (
        (pb.GenerateRequest(chat=pb.Chat()), "chat"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**9])), "token_ids.ids[0]"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 300)), "token_ids"),
        (pb.GenerateRequest(prompt="x" * (256 * 32 + 1)), "prompt"),
        (
            pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="u")] * 1025)),
            "chat.messages",
        ),
    ):
        error = await refused(served.stub, request)
        assert error.code() == INVALID and violation(error).field == field, error.details()


async def test_an_unexpected_error_is_internal_with_an_id_and_no_details(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(served.engine.factory, "build", broken)
    error = await refused(served.stub, greedy(PROMPT, 3))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "error id" in error.details()
    error_id = error.details().split("error id ")[1].split(")")[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


async def test_retryable_refusals_carry_retry_info(tiny: LoadedModel) -> None:
    server = TreadleServer(ServerConfig(host="127.0.0.1", port=0, metrics_port=None), "tiny")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            error = await refused(pb_grpc.GenerationStub(channel), greedy(PROMPT, 3))
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # the model is loading
            assert retry_delay(error) > 0
    finally:
        await server.drain()

    s = await start_served(tiny, EngineConfig(max_batch_rows=1, max_seq_len=256, max_waiting=1))
    try:
        first = s.stub.GenerateStream(greedy(PROMPT, 240))
        await first.read()  # it holds the only row
        second = s.stub.GenerateStream(greedy(PROMPT, 5))  # waits
        await s.until(lambda st: st.waiting >= 1, already=lambda: s.engine.num_waiting >= 1)
        error = await refused(s.stub, greedy(PROMPT, 3))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay(error) > 0
        second.cancel()
        first.cancel()
    finally:
        await s.stop()


async def test_huge_prompts_are_refused_while_health_keeps_answering(served: Served) -> None:
    # C2: three 4 MB prompts (a plain one and two chats) arrive together; the
    # health service answers every check meanwhile and the prompts are refused
    # by their size, before tokenizing.
    big = "word " * 800_000
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=big)])
    requests = [
        pb.GenerateRequest(prompt=big),
        pb.GenerateRequest(chat=chat),
        pb.GenerateRequest(chat=chat, request_id="c"),
    ]
    health = health_pb2_grpc.HealthStub(served.channel)
    latencies: list[float] = []

    async def probe_until(done: asyncio.Future[Any]) -> None:
        while not done.done() and len(latencies) < 10_000:
            started = time.perf_counter()
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            latencies.append(time.perf_counter() - started)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    async def bursts() -> list[grpc.aio.AioRpcError]:
        errors: list[grpc.aio.AioRpcError] = []
        for _ in range(3):
            errors = list(await asyncio.gather(*(refused(served.stub, r) for r in requests)))
        return errors

    calls = asyncio.ensure_future(bursts())
    await asyncio.gather(probe_until(calls), calls)
    errors = calls.result()
    assert [e.code() for e in errors] == [INVALID] * 3
    assert [violation(e).field for e in errors] == ["prompt", "chat", "chat"]
    assert latencies and max(latencies) < 2.0  # generous: the loop was never stalled for long
    latencies.sort()
    print(f"health p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms of {len(latencies)}")


async def session(
    stub: pb_grpc.GenerationStub, outbox: asyncio.Queue[pb.SessionRequest | None]
) -> AsyncIterator[pb.SessionEvent]:
    async def requests() -> AsyncIterator[pb.SessionRequest]:
        while (m := await outbox.get()) is not None:
            yield m

    async for event in stub.Session(requests()):
        yield event


async def test_session_survives_bad_items_and_reports_duplicates_apart(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # C4: a bad item, even one that raises unexpectedly, fails alone; G7: a
    # duplicate id gets a Rejected event and the open request one Finish.
    build = served.engine.factory.build

    def build_or_break(gen: Any, request_id: str, sink: Any) -> Any:
        if gen.priority == 7:
            raise RuntimeError("secret internals")
        return build(gen, request_id, sink)

    monkeypatch.setattr(served.engine.factory, "build", build_or_break)
    outbox: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
    deep = pb.Plugin(name="phrase_boost", args_json="[" * 100_000 + "]" * 100_000)
    for request in (
        greedy(PROMPT, 240, "long"),
        greedy(PROMPT, 5, "deep", plugins=[deep]),
        greedy(PROMPT, 5, "x" * 300),
        greedy(PROMPT, 5, "boom", priority=7),
        greedy(PROMPT, 5, "long"),  # still open
        greedy(PROMPT, 3, "after"),
    ):
        outbox.put_nowait(pb.SessionRequest(generate=request))
    finishes: dict[str, list[pb.Finish]] = {}
    rejections: list[pb.SessionEvent] = []
    async for event in session(served.stub, outbox):
        if event.HasField("rejected"):
            rejections.append(event)
            outbox.put_nowait(pb.SessionRequest(cancel=pb.Cancel(request_id="long")))
        elif event.HasField("finish"):
            finishes.setdefault(event.request_id, []).append(event.finish)
            if len(finishes) == 5:
                outbox.put_nowait(None)
    assert sorted(finishes) == ["", "after", "boom", "deep", "long"]
    assert all(len(f) == 1 for f in finishes.values())  # one finish per id
    assert finishes["after"][0].reason == pb.FINISH_REASON_LENGTH
    assert finishes["long"][0].reason == pb.FINISH_REASON_CANCELLED  # the cancel still worked
    deep_error = finishes["deep"][0].error
    assert deep_error.code == INVALID.value[0] and deep_error.field == "plugins[0].args_json"
    assert finishes[""][0].error.field == "request_id"  # a refused id is not echoed
    boom = finishes["boom"][0].error
    assert boom.code == grpc.StatusCode.INTERNAL.value[0] and "secret" not in boom.message
    (dup,) = rejections
    assert dup.request_id == "long"
    assert dup.rejected.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert dup.rejected.field == "request_id"


async def test_a_long_session_keeps_no_bookkeeping_of_finished_requests(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # C5: per-request state of a Session ends with the request's finish, so a Session
    # with ever new ids (or an id reused once it finished) does not grow.
    sessions: list[service_module._Session] = []

    class Recorded(service_module._Session):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            sessions.append(self)

    monkeypatch.setattr(service_module, "_Session", Recorded)
    ids = [f"id-{i}" for i in range(30)] + ["id-0", "id-0"]
    outbox: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
    outbox.put_nowait(pb.SessionRequest(generate=greedy(PROMPT, 2, ids[0])))
    finished: list[str] = []
    async for event in session(served.stub, outbox):
        if event.HasField("finish"):
            assert event.finish.reason == pb.FINISH_REASON_LENGTH, event
            finished.append(event.request_id)
            (live,) = sessions
            assert len(live.unread) <= 1 and len(live.open) <= 1  # only the next one, if any
            if len(finished) < len(ids):
                request = greedy(PROMPT, 2, ids[len(finished)])
                outbox.put_nowait(pb.SessionRequest(generate=request))
            else:
                outbox.put_nowait(None)
    assert finished == ids
    assert sessions[0].unread == {} and sessions[0].open == {}


async def test_session_caps_requests_in_flight(tiny: LoadedModel) -> None:
    config = EngineConfig(
        max_batch_rows=4, max_seq_len=256, limits=RequestLimits(max_session_requests=2)
    )
    s = await start_served(tiny, config)
    try:
        outbox: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
        for rid in ("a", "b", "c"):
            outbox.put_nowait(pb.SessionRequest(generate=greedy(PROMPT, 240, rid)))
        finishes: dict[str, pb.Finish] = {}
        async for event in session(s.stub, outbox):
            if event.HasField("finish"):
                finishes[event.request_id] = event.finish
                if event.request_id == "c":  # refused: free the others
                    for rid in ("a", "b"):
                        outbox.put_nowait(pb.SessionRequest(cancel=pb.Cancel(request_id=rid)))
                    outbox.put_nowait(None)
        assert finishes["c"].reason == pb.FINISH_REASON_ERROR
        assert finishes["c"].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert finishes["a"].reason == finishes["b"].reason == pb.FINISH_REASON_CANCELLED
        info = await s.stub.ModelInfo(pb.ModelInfoRequest())
        assert info.max_session_requests == 2 and info.max_priority == 10
        assert info.max_prompt_chars == 256 * 32 and info.max_request_id_bytes == 256
    finally:
        await s.stop()


# A client that reads nothing: its receive window is tiny and never grows, so
# the server's writes stall after a few hundred bytes and events pile up there.
SLOW_CLIENT = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


@pytest.mark.parametrize("kind", ["session", "stream"])
async def test_a_slow_reader_is_cut_with_resource_exhausted(tiny: LoadedModel, kind: str) -> None:
    config = EngineConfig(
        max_batch_rows=2, max_seq_len=256, limits=RequestLimits(max_stream_backlog=8)
    )
    s = await start_served(tiny, config)
    try:
        async with grpc.aio.insecure_channel(s.target, options=SLOW_CLIENT) as channel:
            stub = pb_grpc.GenerationStub(channel)
            # logprobs make each event ~250 bytes: 240 of them far exceed the window
            request = greedy(PROMPT, 240, "slow", logprobs=pb.LogprobsOptions(enabled=True, top=20))
            if kind == "session":
                outbox: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
                outbox.put_nowait(pb.SessionRequest(generate=request))
                call = stub.Session(_queue_iter(outbox))
            else:
                call = stub.GenerateStream(request)
            await s.until(lambda st: st.running >= 1, already=lambda: s.engine.num_in_flight > 0)
            await s.idle()  # the request ended without the client reading a thing
            if kind == "session":
                outbox.put_nowait(None)
            events = []
            with pytest.raises(grpc.aio.AioRpcError) if kind == "stream" else _no_error() as info:
                async for event in call:
                    events.append(event)
            tokens = sum(len(e.token.token_ids) for e in events if e.HasField("token"))
            assert tokens < 240
            if kind == "session":
                finish = events[-1].finish
                assert finish.reason == pb.FINISH_REASON_CANCELLED
                assert finish.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                assert "reading too slowly" in finish.error.message
            else:
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "reading too slowly" in info.value.details()
    finally:
        await s.stop()


async def _queue_iter(
    outbox: asyncio.Queue[pb.SessionRequest | None],
) -> AsyncIterator[pb.SessionRequest]:
    while (m := await outbox.get()) is not None:
        yield m


class _no_error:
    value: Any = None

    def __enter__(self) -> _no_error:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
