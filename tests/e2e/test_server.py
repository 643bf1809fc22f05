"""The gRPC service end to end: a real grpc.aio server on loopback, the generated stubs."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest
from e2e.served import Served, greedy, read_rest, start_secured, start_served
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import drive, make_tiny_model
from tls_certs import make_tls

from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.generation_request import GenerationRequest
from treadle.server.server import ServerConfig
from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc
from treadle.worker.loader import LoadedModel

PROMPT = [101, 2045, 3310, 77, 19]


async def session_events(
    stub: pb_grpc.GenerationStub, messages: list[pb.SessionRequest]
) -> list[pb.SessionEvent]:
    async def requests():  # type: ignore[no-untyped-def]
        for m in messages:
            yield m

    return [e async for e in stub.Session(requests())]


def tokens_of(events: list[pb.GenerateEvent] | list[pb.SessionEvent]) -> list[int]:
    return [t for e in events if e.HasField("token") for t in e.token.token_ids]


async def test_unary_stream_and_session_match_the_engine_in_process(
    served: Served, tokenizer: object
) -> None:
    expected = drive(
        Engine(make_tiny_model(tokenizer), EngineConfig(max_batch_rows=4, max_seq_len=256)),
        [
            (
                0,
                GenerationRequest(
                    prompt_token_ids=PROMPT, max_new_tokens=12, ignore_eos=True, request_id="x"
                ),
            )
        ],
    )["x"]
    unary = await served.stub.Generate(greedy(PROMPT, 12, "u"))
    assert list(unary.token_ids) == expected.tokens
    assert unary.text == expected.text
    assert unary.request_id == "u"
    assert unary.finish.reason == pb.FINISH_REASON_LENGTH
    assert unary.finish.usage.generated_tokens == 12

    stream = [e async for e in served.stub.GenerateStream(greedy(PROMPT, 12))]
    assert tokens_of(stream) == expected.tokens
    assert "".join(e.token.text for e in stream if e.HasField("token")) == expected.text
    assert stream[-1].HasField("finish") and all(e.HasField("token") for e in stream[:-1])
    assert len({e.request_id for e in stream}) == 1 and stream[0].request_id  # server-assigned

    events = await session_events(
        served.stub, [pb.SessionRequest(generate=greedy(PROMPT, 12, "s1"))]
    )
    assert tokens_of(events) == expected.tokens
    assert events[-1].request_id == "s1" and events[-1].finish.reason == pb.FINISH_REASON_LENGTH


async def test_session_multiplexes_cancels_and_reports_invalid_requests(served: Served) -> None:
    rng = random.Random(0)
    valid = {f"r{i}": rng.randint(5, 20) for i in range(10)}
    to_cancel = {f"c{i}" for i in range(3)}
    invalid = {
        "bad-temp": greedy(PROMPT, 5, "bad-temp", sampling=pb.SamplingParameters(temperature=-1)),
        "bad-plugin": greedy(PROMPT, 5, "bad-plugin", plugins=[pb.Plugin(name="nope")]),
        "no-input": pb.GenerateRequest(request_id="no-input"),
    }
    outbox: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
    for rid, n in valid.items():
        outbox.put_nowait(pb.SessionRequest(generate=greedy(PROMPT, n, rid)))
    for rid in to_cancel:
        outbox.put_nowait(pb.SessionRequest(generate=greedy(PROMPT, 240, rid)))
    for req in invalid.values():
        outbox.put_nowait(pb.SessionRequest(generate=req))

    async def requests():  # type: ignore[no-untyped-def]
        while (m := await outbox.get()) is not None:
            yield m

    finishes: dict[str, list[pb.Finish]] = {}
    tokens: dict[str, int] = {}
    cancelled_sent = False
    async for event in served.stub.Session(requests()):
        if event.HasField("finish"):
            finishes.setdefault(event.request_id, []).append(event.finish)
            if len(finishes) == 16:
                outbox.put_nowait(None)  # half-close: the stream ends
        else:
            tokens[event.request_id] = tokens.get(event.request_id, 0) + len(event.token.token_ids)
            if not cancelled_sent and all(tokens.get(r, 0) >= 2 for r in to_cancel):
                for rid in to_cancel:
                    outbox.put_nowait(pb.SessionRequest(cancel=pb.Cancel(request_id=rid)))
                cancelled_sent = True
    assert set(finishes) == set(valid) | to_cancel | set(invalid)
    assert all(len(f) == 1 for f in finishes.values())  # exactly one terminal event each
    for rid, n in valid.items():
        assert finishes[rid][0].reason == pb.FINISH_REASON_LENGTH and tokens[rid] == n
    for rid in to_cancel:
        assert finishes[rid][0].reason == pb.FINISH_REASON_CANCELLED
        assert 2 <= tokens[rid] < 240
    for rid in invalid:
        finish = finishes[rid][0]
        assert finish.reason == pb.FINISH_REASON_ERROR
        assert finish.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "temperature" in finishes["bad-temp"][0].error.message
    assert "plugins[0]" in finishes["bad-plugin"][0].error.message
    assert "input" in finishes["no-input"][0].error.message


async def test_deadline_and_disconnect_free_their_rows(served: Served) -> None:
    # Whether gRPC or the engine (which holds the deadline too) notices first,
    # the caller sees DEADLINE_EXCEEDED and the request's row is freed.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in served.stub.GenerateStream(greedy(PROMPT, 240), timeout=0.02):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await served.idle()
    assert served.metrics()["treadle_running_requests"] == 0

    cancelled = "treadle_requests_finished_total{reason=cancelled}"
    before = served.metrics().get(cancelled, 0.0)
    call = served.stub.GenerateStream(greedy(PROMPT, 240))
    got = 0
    async for event in call:
        got += len(event.token.token_ids)
        if got >= 3:
            call.cancel()  # the client goes away mid-stream
            break
    await served.idle()
    metrics = served.metrics()
    assert metrics["treadle_running_requests"] == 0
    assert metrics[cancelled] == before + 1


@pytest.mark.parametrize(
    ("field", "request_kw"),
    [
        ("temperature", {"sampling": pb.SamplingParameters(temperature=-0.5)}),
        ("top_p", {"sampling": pb.SamplingParameters(top_p=1.5)}),
        ("top_p", {"sampling": pb.SamplingParameters(top_p=0.0)}),
        ("plugins[0].name: unknown plugin", {"plugins": [pb.Plugin(name="no_such_plugin")]}),
        ("plugins[0].args_json", {"plugins": [pb.Plugin(name="phrase_boost", args_json="[1]")]}),
        ("stop", {"stopping": pb.StoppingParameters(stop=["x"] * 17)}),
        ("max_new_tokens", {"stopping": pb.StoppingParameters(max_new_tokens=10_000)}),
    ],
)
async def test_invalid_requests_name_the_field(
    served: Served, field: str, request_kw: dict[str, object]
) -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), **request_kw)  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Generate(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)


async def test_empty_input_and_long_prompt_are_refused(served: Served) -> None:
    for request, field in (
        (pb.GenerateRequest(), "input"),
        (pb.GenerateRequest(prompt=""), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 300)), "token_ids"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.stub.Generate(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field)
    assert "limit is 255" in info.value.details()
    assert served.metrics()["treadle_errors_total{code=INVALID_ARGUMENT}"] == 3


async def test_full_queue_answers_resource_exhausted(tiny: LoadedModel) -> None:
    s = await start_served(tiny, EngineConfig(max_batch_rows=1, max_seq_len=256, max_waiting=1))
    try:
        first = s.stub.GenerateStream(greedy(PROMPT, 240))
        await first.read()  # it holds the only row
        second = s.stub.GenerateStream(greedy(PROMPT, 5))  # waits
        await s.until(lambda st: st.waiting >= 1 or s.engine.num_waiting >= 1)
        assert s.metrics()["treadle_queue_depth"] >= 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Generate(greedy(PROMPT, 5))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
        assert tokens_of(await read_rest(second)) != []
    finally:
        await s.stop()


async def test_health_follows_start_serve_and_drain(tiny: LoadedModel) -> None:
    from treadle.server.server import TreadleServer

    server = TreadleServer(ServerConfig(host="127.0.0.1", port=0, metrics_port=None), "tiny")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="")
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(greedy(PROMPT, 3))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the model is loading

        await server.serve(Engine(tiny, EngineConfig(max_batch_rows=2, max_seq_len=256)))
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING

        watch = health.Watch(check)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        running = stub.GenerateStream(greedy(PROMPT, 30))
        await running.read()
        drain = asyncio.ensure_future(server.drain())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        rest = await read_rest(running)  # the request in flight finishes during the drain
        assert rest[-1].finish.reason == pb.FINISH_REASON_LENGTH
        await drain


async def test_token_counter_equals_the_tokens_clients_received(served: Served) -> None:
    results = await asyncio.gather(
        *(served.stub.Generate(greedy(PROMPT[: i + 1], 4 + i)) for i in range(5))
    )
    received = sum(len(r.token_ids) for r in results)
    metrics = served.metrics()
    assert metrics["treadle_generated_tokens_total"] == received  # the warm-up is not counted
    assert metrics["treadle_time_to_first_token_seconds_count"] == 5
    assert metrics["treadle_requests_finished_total{reason=length}"] == 5


async def test_model_info_and_tokenize(served: Served, tokenizer: object) -> None:
    info = await served.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.model == "tiny-llama" and info.max_total_tokens == 256
    assert list(info.eos_token_ids) == [2] and info.max_batch_rows == 4
    assert {"phrase_boost", "confidence_stop"} <= set(info.plugins)
    tok = await served.stub.Tokenize(pb.TokenizeRequest(prompt="Hello world"))
    assert list(tok.token_ids) == tokenizer("Hello world")["input_ids"]  # type: ignore[operator]
    assert tok.tokens == ["Hello", "Ġworld"]


async def test_tls_and_token(tiny: LoadedModel, tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    s = await start_secured(tiny, tls, "s3cret")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Generate(greedy(PROMPT, 2))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", "Bearer s3cret"),)
        wrong = (("authorization", "Bearer nope"),)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Generate(greedy(PROMPT, 2), metadata=wrong)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await s.stub.Generate(greedy(PROMPT, 2), metadata=token)
        assert len(ok.token_ids) == 2
        health = health_pb2_grpc.HealthStub(s.channel)  # health needs no token
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == 1

        bad_ca = grpc.ssl_channel_credentials(tls.other_ca.cert, tls.client.key, tls.client.cert)
        no_client_cert = grpc.ssl_channel_credentials(tls.ca.cert)
        for creds in (bad_ca, no_client_cert):
            async with grpc.aio.secure_channel(
                s.target, creds, options=[("grpc.ssl_target_name_override", "localhost")]
            ) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.GenerationStub(channel).Generate(
                        greedy(PROMPT, 2), metadata=token, timeout=10
                    )
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
    finally:
        await s.stop()
