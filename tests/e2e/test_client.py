"""The Python SDK against real servers on free loopback ports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e.served import Served, greedy, start_secured, start_served
from helpers import make_tiny_model
from tls_certs import make_tls

from treadle.client import (
    AsyncClient,
    Cancelled,
    Client,
    FinishReason,
    InvalidArgument,
    RequestTooLarge,
    RetryPolicy,
    TlsConfig,
    TokenChunk,
    TreadleClientError,
    Unauthenticated,
)
from treadle.scheduler.engine import EngineConfig
from treadle.server.server import ServerConfig
from treadle.v1 import treadle_pb2 as pb
from treadle.worker.loader import LoadedModel

PROMPT = [101, 2045, 3310, 77, 19]


async def raw_tokens(served: Served, max_new: int) -> list[int]:
    response = await served.stub.Generate(greedy(PROMPT, max_new))
    return list(response.token_ids)


async def test_async_generate_stream_and_session_match_the_raw_stubs(served: Served) -> None:
    want = await raw_tokens(served, 10)
    async with AsyncClient(served.target) as client:
        result = await client.generate(token_ids=PROMPT, max_new_tokens=10, ignore_eos=True)
        assert list(result.token_ids) == want and result.reason is FinishReason.LENGTH
        events = [
            e async for e in client.stream(token_ids=PROMPT, max_new_tokens=10, ignore_eos=True)
        ]
        assert [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids] == want
        text = "".join(
            [
                t
                async for t in client.stream_text(
                    token_ids=PROMPT, max_new_tokens=10, ignore_eos=True
                )
            ]
        )
        assert text == result.text
        async with client.session() as session:
            handles = [
                session.submit(token_ids=PROMPT, max_new_tokens=10, ignore_eos=True)
                for _ in range(3)
            ]
            results = [await h.result() for h in handles]
        assert all(list(r.token_ids) == want for r in results)
        assert len({h.request_id for h in handles}) == 3


async def test_sync_client_matches_the_raw_stubs(served: Served) -> None:
    want = await raw_tokens(served, 8)

    def use_sync() -> tuple[list[int], list[int], list[int], str]:
        with Client(served.target) as client:
            unary = list(
                client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
            )
            streamed = [
                t
                for e in client.stream(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True)
                if isinstance(e, TokenChunk)
                for t in e.token_ids
            ]
            with client.session() as session:
                handle = session.submit(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True)
                in_session = list(handle.result().token_ids)
            return unary, streamed, in_session, client.health()

    unary, streamed, in_session, health = await asyncio.to_thread(use_sync)
    assert unary == streamed == in_session == want
    assert health == "SERVING"


async def test_leaving_an_async_stream_early_frees_the_row(served: Served) -> None:
    async with AsyncClient(served.target) as client:
        stream = client.stream(token_ids=PROMPT, max_new_tokens=240, ignore_eos=True)
        received = 0
        async for event in stream:
            received += len(event.token_ids) if isinstance(event, TokenChunk) else 0
            if received >= 3:
                break
        await stream.aclose()
        await served.idle()
    metrics = served.metrics()
    assert metrics["treadle_running_requests"] == 0
    assert metrics["treadle_requests_finished_total{reason=cancelled}"] == 1


async def test_cancelling_the_consuming_task_cancels_the_request(served: Served) -> None:
    async with AsyncClient(served.target) as client:
        first_token = asyncio.Event()

        async def consume() -> None:
            async for _ in client.stream(token_ids=PROMPT, max_new_tokens=240, ignore_eos=True):
                first_token.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(first_token.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await served.idle()
    assert served.metrics()["treadle_requests_finished_total{reason=cancelled}"] == 1


async def test_errors_are_typed_and_carry_the_servers_message(served: Served) -> None:
    async with AsyncClient(served.target) as client:
        with pytest.raises(InvalidArgument) as info:  # checked client-side, nothing sent
            await client.generate("hi", top_p=0.0)
        assert info.value.field == "top_p" and info.value.code is None
        with pytest.raises(InvalidArgument) as info:  # only the server knows the context
            await client.generate(token_ids=PROMPT, max_new_tokens=1000)
        # the field comes from the error's details (None from a server that sends none)
        assert info.value.field is None or info.value.field.endswith("max_new_tokens")
        assert "exceeds the context limit of 256 tokens" in info.value.message
        assert info.value.code is not None
    assert served.metrics()["treadle_errors_total{code=INVALID_ARGUMENT}"] == 1


async def test_no_retry_once_a_token_has_arrived(served: Served) -> None:
    retry = RetryPolicy(max_attempts=5, initial_backoff=0.05)
    async with AsyncClient(served.target, retry=retry) as client:
        stream = client.stream(token_ids=PROMPT, max_new_tokens=240, ignore_eos=True)
        tokens = 0
        with pytest.raises(TreadleClientError):
            async for event in stream:
                if isinstance(event, TokenChunk):
                    tokens += 1
                    if tokens == 2:  # the server goes away mid-answer
                        assert served.server._server is not None
                        await served.server._server.stop(grace=None)
        assert tokens >= 2


async def test_round_robin_spreads_over_replicas_and_survives_one_stopping(
    tokenizer: object,
) -> None:
    servers = [
        await start_served(
            make_tiny_model(tokenizer), EngineConfig(max_batch_rows=4, max_seq_len=256)
        )
        for _ in range(2)
    ]
    targets = [s.target for s in servers]

    def finished(s: Served) -> float:
        return s.metrics().get("treadle_requests_finished_total{reason=length}", 0.0)

    try:
        async with AsyncClient(targets, retry=RetryPolicy(max_attempts=6)) as client:
            # round_robin connects to every replica; until both are connected it uses the
            # ones that are. Sequential calls see both join (bounded).
            for _ in range(50):
                await client.generate(token_ids=PROMPT, max_new_tokens=1)
                if min(finished(s) for s in servers) >= 2:  # a warm-up and one of ours each
                    break
            before = [finished(s) for s in servers]
            await asyncio.gather(
                *(
                    client.generate(token_ids=PROMPT, max_new_tokens=3, ignore_eos=True)
                    for _ in range(20)
                )
            )
            counts = [finished(s) - b for s, b in zip(servers, before, strict=True)]
            assert sum(counts) == 20
            assert min(counts) >= 5, counts  # both replicas took a share

            await servers[0].server.drain()
            results = await asyncio.gather(
                *(
                    client.generate(token_ids=PROMPT, max_new_tokens=3, ignore_eos=True)
                    for _ in range(10)
                )
            )
            assert all(len(r.token_ids) == 3 for r in results)
            assert finished(servers[1]) == before[1] + counts[1] + 10
    finally:
        for s in servers:
            await s.channel.close()
        await servers[1].server.drain()


async def test_model_info_sets_the_client_side_limits(served: Served) -> None:
    async with AsyncClient(served.target) as client:
        info = await client.model_info()
        assert info.max_total_tokens == 256 and "phrase_boost" in info.plugins
        assert client.limits is not None and client.limits.max_stop_strings == 16
        with pytest.raises(InvalidArgument) as caught:
            await client.generate("hi", stop=["x"] * 17)
        assert caught.value.code is None  # refused before sending
        assert await client.tokenize("Hello world") == list(
            (await served.stub.Tokenize(pb.TokenizeRequest(prompt="Hello world"))).token_ids
        )


async def test_tls_token_and_metadata_through_the_sdk(tiny: LoadedModel, tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    s = await start_secured(tiny, tls, "s3cret")
    good = TlsConfig(tls.ca.cert, tls.client.cert, tls.client.key, server_name="localhost")
    try:
        async with AsyncClient(
            s.target, tls=good, token="s3cret", metadata=[("x-team", "search")]
        ) as client:
            result = await client.generate(token_ids=PROMPT, max_new_tokens=3, ignore_eos=True)
            assert len(result.token_ids) == 3
        async with AsyncClient(s.target, tls=good, retry=RetryPolicy.off()) as client:
            with pytest.raises(Unauthenticated):
                await client.generate(token_ids=PROMPT, max_new_tokens=3)
            assert await client.health() == "SERVING"  # health needs no token
    finally:
        await s.stop()


async def test_oversized_requests_are_refused(tiny: LoadedModel) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, max_request_bytes=2048)
    s = await start_served(tiny, server_config=config)
    try:
        async with AsyncClient(s.target) as client:
            with pytest.raises(RequestTooLarge) as info:  # not Overloaded: not a full queue
                await client.generate("word " * 2000, max_new_tokens=2)
            assert not info.value.retryable
            assert "2048" in info.value.message or "larger than max" in info.value.message
            assert len((await client.generate("short", max_new_tokens=2)).token_ids) == 2
    finally:
        await s.stop()


async def test_a_session_handle_keeps_its_result_and_refuses_a_duplicate_id(
    served: Served,
) -> None:
    async with AsyncClient(served.target) as client, client.session() as session:
        handle = session.submit(token_ids=PROMPT, max_new_tokens=4, ignore_eos=True, request_id="a")
        with pytest.raises(InvalidArgument) as dup:  # refused before sending
            session.submit(token_ids=PROMPT, max_new_tokens=4, request_id="a")
        assert dup.value.field == "request_id" and dup.value.code is None
        first = await handle.result()
        assert await handle.result() == first and len(first.token_ids) == 4
        again = session.submit(token_ids=PROMPT, max_new_tokens=2, request_id="a")  # finished
        assert len((await again.result()).token_ids) == 2


async def test_open_session_handles_end_when_the_session_is_cancelled(served: Served) -> None:
    async with AsyncClient(served.target) as client:
        with pytest.raises(RuntimeError):
            async with client.session() as session:
                handle = session.submit(token_ids=PROMPT, max_new_tokens=240, ignore_eos=True)
                await anext(handle)  # running
                raise RuntimeError("the caller gives up")
        async with asyncio.timeout(30):
            with pytest.raises(Cancelled):
                await handle.result()
        await served.idle()
