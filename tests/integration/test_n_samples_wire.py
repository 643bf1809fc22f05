"""n samples of one prompt over the wire: a real grpc.aio server on a tiny random model.

Greedy samples all equal the single request's answer; every sample ends with
its own Finish; `n` beyond the server's limit is refused naming the field; in a
Session a request id stays open until its last sample has finished.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
import torch
from e2e.served import Served, greedy, start_served

from treadle.api.limits import RequestLimits
from treadle.client import AsyncClient
from treadle.scheduler.engine import EngineConfig
from treadle.v1 import treadle_pb2 as pb
from treadle.worker.loader import LoadedModel
from treadle.worker.plan import RowInput
from treadle.worker.plugins import default_registry
from treadle.worker.plugins.base import LogitsPlugin, PluginContext

PROMPT = [101, 2045, 3310, 77, 19]
EOS = 2  # the tiny model's
BOUND = 60  # seconds any wait here may take


async def test_greedy_samples_of_generate_all_equal_the_single_answer(served: Served) -> None:
    single = await served.stub.Generate(greedy(PROMPT, 8, "one"))
    three = await served.stub.Generate(greedy(PROMPT, 8, "three", n=3))
    assert not single.samples  # n = 1: the top-level fields are the one sample
    assert [s.index for s in three.samples] == [0, 1, 2]
    for sample in three.samples:
        assert sample.text == single.text and list(sample.token_ids) == list(single.token_ids)
        assert sample.finish.reason == pb.FINISH_REASON_LENGTH
        assert sample.finish.index == sample.index
    assert three.request_id == "three"
    assert three.text == single.text and three.finish == three.samples[0].finish  # sample 0


async def test_a_stream_of_two_samples_ends_with_two_finishes(served: Served) -> None:
    events = [e async for e in served.stub.GenerateStream(greedy(PROMPT, 6, "two", n=2))]
    finishes = [e.finish for e in events if e.HasField("finish")]
    assert sorted(f.index for f in finishes) == [0, 1]
    assert events[-1].HasField("finish")
    for index in (0, 1):  # each sample's 6 tokens, then its own finish
        tokens = [i for i, e in enumerate(events) if _token_of(e, index)]
        (finish_at,) = [i for i, e in enumerate(events) if _finish_of(e, index)]
        assert tokens and max(tokens) < finish_at
        assert sum(len(events[i].token.token_ids) for i in tokens) == 6


async def test_n_beyond_max_samples_is_refused_naming_n(tiny: LoadedModel) -> None:
    limits = RequestLimits(max_samples=2)
    s = await start_served(tiny, EngineConfig(max_batch_rows=4, max_seq_len=256, limits=limits))
    try:
        assert (await s.stub.ModelInfo(pb.ModelInfoRequest())).max_samples == 2
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await s.stub.Generate(greedy(PROMPT, 4, n=3))
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in s.stub.GenerateStream(greedy(PROMPT, 4, n=3)):
                pass
        for refused in (unary.value, stream.value):
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.details() == "n: must be within [1, 2] (got 3)"
        two = await s.stub.Generate(greedy(PROMPT, 4, n=2))  # at the limit: served
        assert len(two.samples) == 2
    finally:
        await s.stop()


class SampleZeroEndsFirst(LogitsPlugin):
    """Sample 0 generates EOS at once; sample 1 never does, and its steps after its
    first token wait (bounded) until `release` is set. In-process servers only."""

    name = "sample_zero_ends_first"

    def __init__(self) -> None:
        self.release = threading.Event()

    def bind(self, args: Any, ctx: PluginContext) -> object:
        return {"steps": 0}  # each sample's own

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[Any]
    ) -> torch.Tensor:
        for i, (row, state) in enumerate(zip(rows, states, strict=True)):
            if row.sample == 0:
                scores[i] = -torch.inf
                scores[i, EOS] = 0.0
            else:
                scores[i, EOS] = -torch.inf
                if state["steps"] >= 1:  # sample 0 has finished: hold sample 1 here
                    self.release.wait(timeout=BOUND)
                state["steps"] += 1
        return scores


async def test_a_session_id_stays_open_until_both_samples_finish(tiny: LoadedModel) -> None:
    hold = SampleZeroEndsFirst()
    plugins = default_registry()
    plugins.register(hold.name, hold)
    s = await start_served(tiny, plugins=plugins)
    two = pb.GenerateRequest(
        request_id="a",
        token_ids=pb.TokenIds(ids=PROMPT),
        stopping=pb.StoppingParameters(max_new_tokens=4),
        plugins=[pb.Plugin(name=hold.name)],
        n=2,
    )
    outbox: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
    outbox.put_nowait(pb.SessionRequest(generate=two))
    seen: list[str] = []
    try:
        async with asyncio.timeout(BOUND):
            async for event in s.stub.Session(_queue_iter(outbox)):
                assert event.request_id == "a"
                kind = event.WhichOneof("event")
                if kind == "finish":
                    seen.append(f"finish {event.finish.index} {event.finish.reason}")
                elif kind == "rejected":
                    seen.append("rejected")
                if seen[-1:] == [f"finish 0 {pb.FINISH_REASON_EOS}"]:  # sample 1 is held
                    outbox.put_nowait(pb.SessionRequest(generate=greedy(PROMPT, 2, "a")))
                elif seen[-1:] == ["rejected"]:  # "a" is still open: let sample 1 end
                    seen.append("released")
                    hold.release.set()
                elif seen[-1:] == [f"finish 1 {pb.FINISH_REASON_LENGTH}"]:  # "a" is free
                    seen.append("reused")
                    outbox.put_nowait(pb.SessionRequest(generate=greedy(PROMPT, 2, "a")))
                    outbox.put_nowait(None)
    finally:
        hold.release.set()
        await s.stop()
    assert seen == [
        f"finish 0 {pb.FINISH_REASON_EOS}",
        "rejected",
        "released",
        f"finish 1 {pb.FINISH_REASON_LENGTH}",
        "reused",
        f"finish 0 {pb.FINISH_REASON_LENGTH}",
    ]


async def test_the_sdk_returns_every_sample(served: Served) -> None:
    asked: dict[str, Any] = {"token_ids": PROMPT, "max_new_tokens": 5, "ignore_eos": True}
    async with AsyncClient(served.target, timeout=BOUND) as client:
        result = await client.generate(**asked, n=3)
        assert [s.index for s in result.samples] == [0, 1, 2]
        assert all(s.text == result.text and len(s.token_ids) == 5 for s in result.samples)
        streamed = await client.stream(**asked, n=2).result()
        assert [s.token_ids for s in streamed.samples] == [result.token_ids] * 2
        async with client.session() as session:
            handle = session.submit(**asked, n=2)
            assert [s.text for s in (await handle.result()).samples] == [result.text] * 2


async def test_the_cli_prints_each_sample_labelled(served: Served) -> None:
    cli = [sys.executable, "-m", "treadle.client.cli", "generate", "Hello", "--target"]
    flags = ["--max-new-tokens", "3", "--ignore-eos", "-n", "2"]
    proc = await asyncio.create_subprocess_exec(
        *cli,
        served.target,
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode == 0, err.decode()
    async with AsyncClient(served.target, timeout=BOUND) as client:
        text = (await client.generate("Hello", max_new_tokens=3, ignore_eos=True)).text
    assert out.decode() == f"[sample 0]\n{text}\n[sample 1]\n{text}\n"
    finish_lines = [line for line in err.decode().splitlines() if "[length] 3 tokens" in line]
    assert [line.split(":")[0] for line in finish_lines] == ["sample 0", "sample 1"]


def _token_of(event: pb.GenerateEvent, index: int) -> bool:
    return event.HasField("token") and event.token.index == index


def _finish_of(event: pb.GenerateEvent, index: int) -> bool:
    return event.HasField("finish") and event.finish.index == index


async def _queue_iter(
    outbox: asyncio.Queue[pb.SessionRequest | None],
) -> AsyncIterator[pb.SessionRequest]:
    while (m := await outbox.get()) is not None:
        yield m
