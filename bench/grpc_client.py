"""The client side of the gRPC runs: workload items as GenerateStream calls on one channel.

Nothing here starts a server: every function takes a channel or a stub, so
the tests can point them at an in-process server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

from .run_result import BenchmarkError
from .traces import Ending, StreamFn, check_ending
from .workload import WorkItem, Workload

SERVING = health_pb2.HealthCheckResponse.SERVING


def chat_of(item: WorkItem) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role=m.role, content=m.content) for m in item.messages])


def request_of(item: WorkItem, max_new_tokens: int | None = None) -> pb.GenerateRequest:
    """The wire request of `item`: its chat, greedy, EOS ignored, its budget (or the one given)."""
    return pb.GenerateRequest(
        request_id=item.id,
        chat=chat_of(item),
        stopping=pb.StoppingParameters(
            max_new_tokens=item.max_new_tokens if max_new_tokens is None else max_new_tokens,
            ignore_eos=True,
        ),
    )


def grpc_stream(stub: pb_grpc.GenerationStub) -> StreamFn:
    """A StreamFn over `GenerateStream`: yields the token count of each token event.

    Raises BenchmarkError when the call fails, ends without a Finish, or the
    Finish is not FINISH_REASON_LENGTH with exactly the budget generated.
    """

    async def stream(item: WorkItem) -> AsyncIterator[int]:
        finish: pb.Finish | None = None
        try:
            async for event in stub.GenerateStream(request_of(item)):
                if event.HasField("token"):
                    yield len(event.token.token_ids)
                else:
                    finish = event.finish
        except grpc.aio.AioRpcError as exc:
            raise BenchmarkError(f"{item.id}: {exc.code().name}: {exc.details()}") from exc
        check_finish(item, finish)

    return stream


def check_finish(item: WorkItem, finish: pb.Finish | None) -> None:
    """The request must have ended by its budget, with exactly that many tokens generated."""
    ending = None
    if finish is not None:
        ending = Ending(
            reason=pb.FinishReason.Name(finish.reason),
            by_budget=finish.reason == pb.FINISH_REASON_LENGTH,
            generated=finish.usage.generated_tokens,
            message=finish.error.message,
        )
    check_ending(item, ending)


async def warm_up(stub: pb_grpc.GenerationStub, item: WorkItem) -> None:
    """One untimed 2-token request, as the in-process run has (connection, chat template)."""
    async for _ in stub.GenerateStream(request_of(item, max_new_tokens=2)):
        pass


async def wait_serving(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """Follow the grpc.health.v1 Watch stream until SERVING; TimeoutError after `timeout_s`."""
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(timeout_s):
        async for update in health.Watch(health_pb2.HealthCheckRequest(service="")):
            if update.status == SERVING:
                return
    raise BenchmarkError("the health Watch stream ended before SERVING")


async def check_server(
    stub: pb_grpc.GenerationStub, workload: Workload, model: str, max_batch_rows: int
) -> None:
    """The server must serve `model` with `max_batch_rows` and see the workload's prompt ids.

    So the gRPC runs do the same work as the in-process one: same model, same
    batch, same prompts after the chat template (checked with Tokenize).
    """
    info = await stub.ModelInfo(pb.ModelInfoRequest())
    if info.model != model:
        raise BenchmarkError(f"the server serves {info.model!r}, the in-process runs {model!r}")
    if info.max_batch_rows != max_batch_rows:
        raise BenchmarkError(
            f"the server runs {info.max_batch_rows} rows, the in-process engine {max_batch_rows}"
        )
    for item, prompt in zip(workload.items, workload.prompts, strict=True):
        got = await stub.Tokenize(pb.TokenizeRequest(chat=chat_of(item)))
        if list(got.token_ids) != list(prompt):
            raise BenchmarkError(f"{item.id}: the server's prompt ids differ from the workload's")
