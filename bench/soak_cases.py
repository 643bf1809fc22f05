"""The soak's request mix: what each request does, and whether its outcome was right.

Every case is drawn from a seeded generator, so a run can be repeated. Kinds:

  stream, unary, session   complete normally: Finish LENGTH with exactly the budget
  cancel                   a GenerateStream the client cancels after its first token
  deadline                 a GenerateStream with a deadline shorter than its work
  abandon                  a GenerateStream on its own channel, closed after the first
                           token without a goodbye
  malformed                one field made invalid: INVALID_ARGUMENT naming that field

Outcomes are judged on the client: `lost` is a request that never got a
terminal answer (no Finish and no status) within the hang guard; `wrong` is a
terminal answer that is not what the kind must get; UNKNOWN and INTERNAL
statuses are counted apart (there must be none).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

HANG_GUARD_S = 300.0  # a call open this long is lost
MIX: tuple[tuple[str, float], ...] = (  # kind, share of the requests
    ("stream", 0.40),
    ("unary", 0.10),
    ("session", 0.10),
    ("cancel", 0.10),
    ("deadline", 0.10),
    ("abandon", 0.10),
    ("malformed", 0.10),
)
BAD_STATUSES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def _malformations() -> list[tuple[str, Callable[[pb.GenerateRequest], None]]]:
    """(the field the error must name, how to break a valid request)."""

    def unset_input(r: pb.GenerateRequest) -> None:
        r.ClearField("chat")

    def plugin(r: pb.GenerateRequest) -> None:
        r.plugins.add(name="no_such_plugin")

    def top_logprobs(r: pb.GenerateRequest) -> None:
        r.logprobs.enabled = True
        r.logprobs.top = 10**6

    return [
        ("temperature", lambda r: setattr(r.sampling, "temperature", -1.0)),
        ("top_p", lambda r: setattr(r.sampling, "top_p", 2.0)),
        ("max_new_tokens", lambda r: setattr(r.stopping, "max_new_tokens", 10**9)),
        ("top", top_logprobs),
        ("stop", lambda r: r.stopping.stop.extend(["x"] * 1000)),
        ("request_id", lambda r: setattr(r, "request_id", "r" * 100_000)),
        ("prompt", unset_input),
        ("plugins", plugin),
    ]


MALFORMATIONS = _malformations()


@dataclass(frozen=True, slots=True)
class Case:
    index: int
    kind: str
    chat: pb.Chat
    max_new_tokens: int
    deadline_s: float = 0.0  # deadline kind only
    broken_field: str = ""  # malformed kind only
    break_it: Callable[[pb.GenerateRequest], None] | None = None

    def request(self, request_id: str = "") -> pb.GenerateRequest:
        req = pb.GenerateRequest(
            request_id=request_id,
            chat=self.chat,
            stopping=pb.StoppingParameters(max_new_tokens=self.max_new_tokens, ignore_eos=True),
        )
        if self.break_it is not None:
            self.break_it(req)
        return req


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    status: str  # the gRPC status name the client saw, or "OK"
    lost: bool = False
    wrong: str = ""  # why the outcome is wrong; empty when right


def draw_cases(chats: list[pb.Chat], n: int, seed: int, max_new_tokens: int) -> list[Case]:
    """`n` cases in the MIX's proportions, in a seeded random order."""
    rng = random.Random(seed)
    kinds = [k for k, share in MIX for _ in range(round(share * n))]
    kinds = (kinds + ["stream"] * n)[:n]
    rng.shuffle(kinds)
    cases = []
    for i, kind in enumerate(kinds):
        budget = rng.randint(1, max_new_tokens)
        case = Case(i, kind, rng.choice(chats), budget)
        if kind == "deadline":
            case = Case(i, kind, case.chat, 4 * max_new_tokens, deadline_s=rng.uniform(0.02, 0.5))
        elif kind in ("cancel", "abandon"):
            case = Case(i, kind, case.chat, 2 * max_new_tokens)
        elif kind == "malformed":
            field, how = rng.choice(MALFORMATIONS)
            case = Case(i, kind, case.chat, budget, broken_field=field, break_it=how)
        cases.append(case)
    return cases


async def run_case(case: Case, stub: pb_grpc.GenerationStub, target: str) -> Outcome:
    """Send one case and judge what came back (never raises for a gRPC outcome)."""
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            return await _RUNNERS[case.kind](case, stub, target)
    except TimeoutError:
        return Outcome(case.kind, "HANG", lost=True, wrong="no terminal answer")
    except grpc.aio.AioRpcError as err:
        return _judge_error(case, err)


def _judge_error(case: Case, err: grpc.aio.AioRpcError) -> Outcome:
    code, details = err.code(), err.details() or ""
    expected = {
        "malformed": (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED),
        "deadline": (grpc.StatusCode.DEADLINE_EXCEEDED,),
        "cancel": (grpc.StatusCode.CANCELLED,),
        "abandon": (grpc.StatusCode.CANCELLED,),
    }.get(case.kind, ())
    wrong = "" if code in expected else f"{code.name}: {details[:200]}"
    invalid = code is grpc.StatusCode.INVALID_ARGUMENT
    if case.kind == "malformed" and invalid and case.broken_field not in details:
        wrong = f"the error does not name {case.broken_field!r}: {details[:200]}"
    return Outcome(case.kind, code.name, wrong=wrong)


def _judge_finish(case: Case, finish: pb.Finish | None) -> Outcome:
    if finish is None:
        return Outcome(case.kind, "OK", lost=True, wrong="the stream ended without a Finish")
    if case.kind == "deadline":  # finished before its deadline: fine
        ok = finish.reason == pb.FINISH_REASON_LENGTH
    else:
        ok = (
            case.kind in ("stream", "unary", "session")
            and finish.reason == pb.FINISH_REASON_LENGTH
            and finish.usage.generated_tokens == case.max_new_tokens
        )
    wrong = "" if ok else f"{pb.FinishReason.Name(finish.reason)} {finish.error.message[:200]}"
    return Outcome(case.kind, "OK", wrong=wrong)


async def _stream(case: Case, stub: pb_grpc.GenerationStub, target: str) -> Outcome:
    finish = None
    timeout = case.deadline_s or None
    async for event in stub.GenerateStream(case.request(), timeout=timeout):
        if event.HasField("finish"):
            finish = event.finish
    return _judge_finish(case, finish)


async def _unary(case: Case, stub: pb_grpc.GenerationStub, target: str) -> Outcome:
    response = await stub.Generate(case.request())
    return _judge_finish(case, response.finish)


async def _session(case: Case, stub: pb_grpc.GenerationStub, target: str) -> Outcome:
    ids = [f"s{case.index}-{k}" for k in range(3)]
    requests = [pb.SessionRequest(generate=case.request(rid)) for rid in ids]
    finishes: dict[str, list[pb.Finish]] = {rid: [] for rid in ids}
    async for event in stub.Session(iter(requests)):
        if event.HasField("finish"):
            finishes.setdefault(event.request_id, []).append(event.finish)
    for rid, got in finishes.items():
        if len(got) != 1:
            return Outcome(case.kind, "OK", lost=not got, wrong=f"{rid}: {len(got)} finishes")
        outcome = _judge_finish(case, got[0])
        if outcome.wrong:
            return outcome
    return Outcome(case.kind, "OK")


async def _cancel(case: Case, stub: pb_grpc.GenerationStub, target: str) -> Outcome:
    call = stub.GenerateStream(case.request())
    first = await call.read()
    if first is grpc.aio.EOF or first.HasField("finish"):
        return Outcome(case.kind, "OK", wrong="ended before it could be cancelled")
    call.cancel()
    return Outcome(case.kind, "CANCELLED")


async def _abandon(case: Case, stub: pb_grpc.GenerationStub, target: str) -> Outcome:
    channel = grpc.aio.insecure_channel(target)
    try:
        call = pb_grpc.GenerationStub(channel).GenerateStream(case.request())
        first = await call.read()
        if first is grpc.aio.EOF or first.HasField("finish"):
            return Outcome(case.kind, "OK", wrong="ended before it could be abandoned")
    finally:
        await channel.close(grace=None)  # no cancel, no half-close: the connection just goes
    return Outcome(case.kind, "ABANDONED")


_RUNNERS = {
    "stream": _stream,
    "unary": _unary,
    "session": _session,
    "cancel": _cancel,
    "deadline": _stream,
    "abandon": _abandon,
    "malformed": _unary,
}
