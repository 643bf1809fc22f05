"""The SDK assembles n samples from scripted wire events: streams end after the n-th
finish, results hold every sample, a Session keeps an id open until its last finish."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from treadle.api.outcome import FinishReason
from treadle.client import InternalError, InvalidArgument, TokenChunk
from treadle.client.session import AsyncSession
from treadle.client.streams import ResponseStream
from treadle.v1 import treadle_pb2 as pb

LENGTH, ERROR = pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_ERROR


def chunk(index: int, ids: list[int], text: str) -> pb.TokenChunk:
    logprobs = [pb.TokenLogprob(token_id=t, logprob=-0.5) for t in ids]
    return pb.TokenChunk(token_ids=ids, text=text, logprobs=logprobs, index=index)


def end(index: int, reason: int = LENGTH, code: int = 0) -> pb.Finish:
    error = pb.Error(code=code, message="kaboom") if code else None
    return pb.Finish(reason=reason, usage=pb.Usage(generated_tokens=2), index=index, error=error)


def two_samples(last: pb.Finish | None = None) -> list[pb.GenerateEvent]:
    """Two samples' events, interleaved; sample 1 ends with `last` (LENGTH by default)."""
    return [
        pb.GenerateEvent(request_id="r", token=chunk(0, [10], "a")),
        pb.GenerateEvent(request_id="r", token=chunk(1, [20], "x")),
        pb.GenerateEvent(request_id="r", token=chunk(1, [21], "y")),
        pb.GenerateEvent(request_id="r", finish=end(0)),
        pb.GenerateEvent(request_id="r", token=chunk(0, [11], "b")),  # out of order on purpose
        pb.GenerateEvent(request_id="r", finish=last or end(1)),
    ]


class ScriptedCall:
    """A grpc.aio streaming call that answers `messages`, then EOF."""

    def __init__(self, messages: Sequence[Any]) -> None:
        self.messages = list(messages)
        self.cancelled = False

    async def read(self) -> Any:
        return self.messages.pop(0) if self.messages else grpc.aio.EOF

    def cancel(self) -> None:
        self.cancelled = True


def stream_of(messages: Sequence[Any], samples: int) -> tuple[ResponseStream, ScriptedCall]:
    call = ScriptedCall(messages)
    return ResponseStream(lambda: call, samples=samples), call


async def test_a_stream_of_two_samples_ends_after_the_second_finish() -> None:
    extra = pb.GenerateEvent(request_id="r", token=chunk(0, [99], "?"))  # never read
    stream, call = stream_of([*two_samples(), extra], samples=2)
    events = [e async for e in stream]
    assert len(events) == 6 and call.messages == [extra]
    assert [e.index for e in events if isinstance(e, TokenChunk)] == [0, 1, 1, 0]


async def test_a_stream_result_holds_every_sample_and_sample_0_on_top() -> None:
    stream, _ = stream_of(two_samples(), samples=2)
    result = await stream.result()
    assert [(s.index, s.text, s.token_ids) for s in result.samples] == [
        (0, "ab", (10, 11)),
        (1, "xy", (20, 21)),
    ]
    assert [lp.token_id for lp in result.samples[1].logprobs] == [20, 21]
    assert (result.text, result.token_ids, result.finish) == (
        "ab",
        (10, 11),
        result.samples[0].finish,
    )
    assert result.request_id == "r" and result.reason is FinishReason.LENGTH


async def test_text_is_sample_0s() -> None:
    stream, _ = stream_of(two_samples(), samples=2)
    assert [t async for t in stream.text()] == ["a", "b"]


async def test_a_failed_sample_fails_the_result() -> None:
    stream, _ = stream_of(two_samples(end(1, ERROR, code=13)), samples=2)
    with pytest.raises(InternalError, match="kaboom"):
        await stream.result()


async def test_a_stream_that_ends_before_every_finish_raises() -> None:
    stream, _ = stream_of(two_samples()[:4], samples=2)  # sample 1 never finishes
    with pytest.raises(InternalError, match="without a finish"):
        await stream.result()


def session_with(requests: list[pb.GenerateRequest]) -> AsyncSession:
    """A session that is never opened: what it would send lands in `requests`."""

    def build(prompt: Any, token_ids: Any, params: Any, request_id: str, overrides: Any) -> Any:
        request = pb.GenerateRequest(request_id=request_id, n=overrides.get("n", 1))
        requests.append(request)
        return request

    return AsyncSession(stub=None, build=build, metadata=(), timeout=None)


def session_event(message: pb.GenerateEvent) -> pb.SessionEvent:
    kind = message.WhichOneof("event")
    return pb.SessionEvent(request_id="a", **{kind: getattr(message, kind)})


async def test_a_session_request_stays_open_until_its_last_sample_finishes() -> None:
    sent: list[pb.GenerateRequest] = []
    session = session_with(sent)
    handle = session.submit("hi", request_id="a", n=2)
    assert sent[0].n == 2 and handle.samples == 2
    events = [session_event(m) for m in two_samples()]
    for event in events[:4]:  # up to sample 0's finish
        session._deliver(event)
    with pytest.raises(InvalidArgument, match="already open"):
        session.submit("hi", request_id="a")
    for event in events[4:]:
        session._deliver(event)
    result = await handle.result()
    assert [(s.index, s.text) for s in result.samples] == [(0, "ab"), (1, "xy")]
    assert handle.done
    again = session.submit("hi", request_id="a")  # both finished: the id is free
    assert again.samples == 1 and sent[-1].n == 1
