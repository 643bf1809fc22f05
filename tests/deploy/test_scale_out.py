"""Scale-out on loopback: two `treadle serve` replicas behind the SDK's round_robin, one of them
stopped with SIGTERM mid-run, as Kubernetes stops a pod in a rollout or a scale-in.

Each replica serves a different tiny model (other seeds), so a request's greedy tokens tell
which replica produced it. The replicas' own metrics count what each one finished; together the
two sides show that no request was lost, duplicated, or sent to the draining replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from deploy.support import ServeProcess
from e2e.served import greedy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from treadle.client import AsyncClient, Finish, FinishReason, RetryPolicy, TokenChunk
from treadle.v1 import treadle_pb2_grpc as pb_grpc

PROMPT = [101, 2045, 3310, 77, 19]
WAVE = 24  # concurrent streams running when the SIGTERM comes
WAVE_TOKENS = 200
AFTER = 12  # requests sent once the replica drains
AFTER_TOKENS = 16
# A request held open on the draining replica, much longer than the wave: it keeps that
# replica (and its /metrics) up until the test has counted, then is cancelled. It starts after
# every wave request there is running, so all of those end first, whatever the timing.
HOLD_TOKENS = 500  # prompt + this within the tiny model's 512 positions
ROWS = 20  # requests running at once per replica: the whole wave runs at once, none queues


@dataclass
class Outcome:
    """What the client saw of one request."""

    tokens: list[int] = field(default_factory=list)
    finishes: list[Finish] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # its first token came


async def stream(client: AsyncClient, budget: int, outcome: Outcome | None = None) -> Outcome:
    outcome = outcome or Outcome()
    try:
        async for event in client.stream(token_ids=PROMPT, max_new_tokens=budget, ignore_eos=True):
            if isinstance(event, TokenChunk):
                outcome.tokens.extend(event.token_ids)
                outcome.started.set()
            else:
                outcome.finishes.append(event)
    finally:
        outcome.started.set()  # a failed stream must not leave anyone waiting
    return outcome


def counter(server: ServeProcess, name: str, **labels: str) -> float:
    """A counter of the replica's /metrics, scraped now (0 before the series exists)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and s.labels == labels
    )


def completed(server: ServeProcess) -> float:
    return counter(server, "treadle_requests_finished_total", reason="length")


def refused(server: ServeProcess) -> float:
    return counter(server, "treadle_errors_total", code="UNAVAILABLE")


async def test_sigterm_drains_one_replica_while_the_other_takes_new_requests(
    tiny_model_dirs: list[Path],
) -> None:
    # one torch thread each: two replicas share this machine's cores
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    serve = [sys.executable, "-m", "treadle.client.cli", "serve", "--host", "127.0.0.1"]
    flags = ["--port", "0", "--http-port", "0", "--metrics-port", "0"]
    flags += ["--max-batch-rows", str(ROWS)]
    servers = [
        await ServeProcess.start(
            [*serve, *flags, "--grace-period", "60", "--model", str(model)], env, f"replica {i}"
        )
        for i, model in enumerate(tiny_model_dirs)
    ]
    channels: list[grpc.aio.Channel] = []
    try:
        for server in servers:
            await server.listening()
        await asyncio.gather(*(s.wait_serving() for s in servers))
        channels = [grpc.aio.insecure_channel(s.target) for s in servers]
        stubs = [pb_grpc.GenerationStub(c) for c in channels]
        # Each replica's own greedy answer: the fingerprint of its results.
        refs = [
            list((await stub.Generate(greedy(PROMPT, WAVE_TOKENS), timeout=60)).token_ids)
            for stub in stubs
        ]
        assert refs[0][0] != refs[1][0], "the two tiny models must answer differently"

        def replica(tokens: list[int]) -> int:
            matches = [i for i, ref in enumerate(refs) if tokens == ref[: len(tokens)]]
            assert len(matches) == 1, f"tokens {tokens[:5]}... match {matches}"
            return matches[0]

        retry = RetryPolicy(max_attempts=20, initial_backoff=0.02, max_backoff=0.2)
        async with AsyncClient([s.target for s in servers], retry=retry, timeout=120) as client:
            # round_robin only uses connected replicas: call until both have answered (bounded).
            seen = set()
            for _ in range(50):
                one = await client.generate(token_ids=PROMPT, max_new_tokens=1, ignore_eos=True)
                seen.add(replica(list(one.token_ids)))
                if len(seen) == 2:
                    break
            assert seen == {0, 1}
            before = [completed(s) for s in servers]

            wave = [Outcome() for _ in range(WAVE)]
            tasks = [asyncio.ensure_future(stream(client, WAVE_TOKENS, o)) for o in wave]
            async with asyncio.timeout(60):  # every stream has a token: all of them run
                await asyncio.gather(*(o.started.wait() for o in wave))
            for task in tasks:
                if task.done():
                    task.result()  # a stream that failed early fails here, with its error
            on = [replica(o.tokens) for o in wave]
            assert on.count(0) >= 2 and on.count(1) >= 2, on  # the wave is spread

            hold = stubs[0].GenerateStream(greedy(PROMPT, HOLD_TOKENS))
            assert (await hold.read()).HasField("token")  # running, after the wave's
            servers[0].proc.send_signal(signal.SIGTERM)
            draining = await servers[0].wait_log(r"draining: (\d+) requests in flight", 30)
            # Mid-run: the held request and replica 0's share of the wave are still running.
            assert int(draining.group(1)) == on.count(0) + 1
            health = health_pb2_grpc.HealthStub(channels[0])
            status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING

            async with asyncio.timeout(120):
                after = await asyncio.gather(*(stream(client, AFTER_TOKENS) for _ in range(AFTER)))
                await asyncio.gather(*(t for t, i in zip(tasks, on, strict=True) if i == 0))
            # Replica 0 drained its share of the wave; it is still up (the held request runs),
            # so its own count can be read: exactly its share, nothing twice, nothing unseen,
            # and every call it refused while draining was retried elsewhere.
            assert completed(servers[0]) - before[0] == on.count(0)
            assert not hold.done()
            async with asyncio.timeout(120):
                await asyncio.gather(*tasks)
            assert completed(servers[1]) - before[1] == on.count(1) + AFTER

            # Every request ended once, complete, on the replica its tokens name.
            for outcome, budget in [(o, WAVE_TOKENS) for o in wave] + [
                (o, AFTER_TOKENS) for o in after
            ]:
                assert [f.reason for f in outcome.finishes] == [FinishReason.LENGTH]
                assert outcome.finishes[0].usage.generated_tokens == budget
                assert len(outcome.tokens) == budget
            assert [replica(o.tokens) for o in wave] == on
            assert {replica(o.tokens) for o in after} == {1}  # none went to the draining one

        hold.cancel()
        async with asyncio.timeout(60):
            assert await servers[0].proc.wait() == 0  # the drain ends, the process exits 0
        assert servers[1].proc.returncode is None  # the other replica serves on
        await servers[0].wait_log(r"drained")
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop()
