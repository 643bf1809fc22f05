"""The SDK fails safe: gRPC's own retries, structured error details, shutdown-cut requests,
health of a server that is not serving.

The servers here are real grpc.aio servers on free loopback ports whose
servicers fail on purpose (scripted), so each failure is deterministic.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from e2e.served import not_serving_health
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from treadle.api.outcome import Usage
from treadle.client import (
    AsyncClient,
    Client,
    InvalidArgument,
    Overloaded,
    RetryPolicy,
    TokenChunk,
    Unavailable,
)
from treadle.client.connection import Connection
from treadle.scheduler.events import SHUTTING_DOWN, FinishEvent
from treadle.server.proto_convert import finish_to_proto
from treadle.server.status_codes import code_number, finish_code
from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


def shutdown_finish(generated: int) -> pb.Finish:
    """The Finish the treadle server sends for a request its shutdown cut (its own encoding)."""
    event = FinishEvent(
        "r",
        SHUTTING_DOWN.reason,
        Usage(3, 0, generated, 0.0, 0.01, 0.1),
        message=SHUTTING_DOWN.message,
        cause=SHUTTING_DOWN.cause,
    )
    return finish_to_proto(event, code_number(finish_code(event)))


def details(code: int, message: str, *details: Any) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying a google.rpc.Status with `details`."""
    status = status_pb2.Status(code=code, message=message)
    for d in details:
        status.details.add().Pack(d)
    return (("grpc-status-details-bin", status.SerializeToString()),)


class Scripted(pb_grpc.GenerationServicer):
    """Fails the first `failures` attempts of each call with UNAVAILABLE, then answers."""

    def __init__(self) -> None:
        self.failures = 0
        self.attempts = 0
        self.abort: tuple[grpc.StatusCode, str, Any] | None = None  # fail every call so
        self.response = pb.GenerateResponse(
            request_id="r", text="ok", finish=pb.Finish(reason=pb.FINISH_REASON_LENGTH)
        )

    async def _refuse_first(self, context: Any) -> None:
        self.attempts += 1
        if self.abort is not None:
            code, message, trailing = self.abort
            await context.abort(code, message, trailing_metadata=trailing or ())
        if self.attempts <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        await self._refuse_first(context)
        return self.response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateEvent]:
        await self._refuse_first(context)
        yield pb.GenerateEvent(request_id="r", token=pb.TokenChunk(token_ids=[5], text="a"))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "gone mid-answer")

    async def Session(
        self, requests: AsyncIterator[pb.SessionRequest], context: Any
    ) -> AsyncIterator[pb.SessionEvent]:
        async for message in requests:  # one token for the first request, then the server dies
            rid = message.generate.request_id
            yield pb.SessionEvent(request_id=rid, token=pb.TokenChunk(token_ids=[5], text="a"))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server went away")


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    server = grpc.aio.server()
    servicer = Scripted()
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_grpc_retries_unavailable_until_the_server_answers(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    servicer.failures = 2
    async with AsyncClient(target, retry=FAST) as client:
        assert (await client.generate("hi")).text == "ok"
    assert servicer.attempts == 3
    servicer.attempts = 0
    async with AsyncClient(target, retry=RetryPolicy.off()) as client:
        with pytest.raises(Unavailable) as caught:
            await client.generate("hi")
    assert servicer.attempts == 1 and caught.value.retryable


async def test_a_stream_is_retried_before_its_first_event_never_after(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    servicer.failures = 2
    tokens = []
    async with AsyncClient(target, retry=FAST) as client:
        with pytest.raises(Unavailable, match="gone mid-answer"):
            async for event in client.stream("hi"):
                assert isinstance(event, TokenChunk)
                tokens.append(event.text)
    assert tokens == ["a"]  # the token arrived once: nothing was repeated
    assert servicer.attempts == 3  # two refusals retried, the failure after a token not


async def test_the_retry_budget_is_in_the_config_and_stops_retries(
    scripted: tuple[Scripted, str],
) -> None:
    config = Connection(retry=RetryPolicy(budget_tokens=7, budget_ratio=0.25)).service_config()
    assert config["retryThrottling"] == {"maxTokens": 7, "tokenRatio": 0.25}
    policy = json.loads(json.dumps(config))["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and policy["maxAttempts"] == 4
    assert (
        "retryPolicy" not in Connection(retry=RetryPolicy.off()).service_config()["methodConfig"][0]
    )  # type: ignore[index]

    servicer, target = scripted
    servicer.failures = 1
    # two tokens: the first failure leaves one, not above half the budget: no retry
    async with AsyncClient(target, retry=FAST.__class__(budget_tokens=2)) as client:
        with pytest.raises(Unavailable):
            await client.generate("hi")
    assert servicer.attempts == 1


async def test_errors_read_the_field_and_retry_delay_from_the_details(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    violation = error_details_pb2.BadRequest.FieldViolation(
        field="plugins[0].args_json", description="nested too deep"
    )
    message = "plugins[0].args_json: nested too deep"
    servicer.abort = (
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
        details(
            code_pb2.INVALID_ARGUMENT,
            message,
            error_details_pb2.BadRequest(field_violations=[violation]),
        ),
    )
    async with AsyncClient(target, retry=FAST) as client:
        with pytest.raises(InvalidArgument) as bad:
            await client.generate("hi")
        assert bad.value.field == "plugins[0].args_json" and not bad.value.retryable

        servicer.abort = (grpc.StatusCode.INVALID_ARGUMENT, "top_p: must be within", None)
        with pytest.raises(InvalidArgument) as plain:
            await client.generate("hi")
        assert plain.value.field is None  # no details: the text is not parsed

        delay = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=1, nanos=5 * 10**8)
        )
        servicer.abort = (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the queue is full",
            details(code_pb2.RESOURCE_EXHAUSTED, "the queue is full", delay),
        )
        servicer.attempts = 0
        with pytest.raises(Overloaded) as full:
            await client.generate("hi")
        assert full.value.retry_after == 1.5 and full.value.retryable
        assert servicer.attempts == 1  # left to the caller, who knows whether to wait


async def test_a_request_cut_by_shutdown_raises_unavailable_not_a_result(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    servicer.response = pb.GenerateResponse(
        request_id="r", text="partial", token_ids=[5, 6], finish=shutdown_finish(2)
    )
    async with AsyncClient(target) as client:
        with pytest.raises(Unavailable) as caught:
            await client.generate("hi")
    assert caught.value.retryable and "server shutting down" in caught.value.message
    assert "after 2 tokens" in caught.value.message


async def test_session_handles_end_when_the_server_ends_the_session(
    scripted: tuple[Scripted, str],
) -> None:
    _, target = scripted
    async with AsyncClient(target) as client:
        with pytest.raises(Unavailable):
            async with client.session() as session:
                first = session.submit("one", request_id="a")
                async with asyncio.timeout(30):
                    with pytest.raises(Unavailable, match="server went away"):
                        await first.result()
                    with pytest.raises(Unavailable):  # the same answer again
                        await first.result()
                with pytest.raises(Unavailable):  # an ended session takes no more
                    session.submit("two")


async def test_health_reports_not_serving_instead_of_unreachable() -> None:
    async with not_serving_health() as target:
        async with AsyncClient(target, timeout=10) as client:
            assert await client.health() == "NOT_SERVING"
        status = await asyncio.to_thread(_sync_health, target)
        assert status == "NOT_SERVING"


def _sync_health(target: str) -> str:
    with Client([target], timeout=10) as client:
        return client.health()
