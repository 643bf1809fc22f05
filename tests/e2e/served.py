"""Helpers for the end-to-end tests: a real grpc.aio server on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tls_certs import TlsFiles

from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.step_stats import StepStats
from treadle.server.server import ServerConfig, TreadleServer
from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc
from treadle.worker.loader import LoadedModel
from treadle.worker.plugins import PluginRegistry


@dataclass
class Served:
    server: TreadleServer
    engine: Engine
    channel: grpc.aio.Channel
    stub: pb_grpc.GenerationStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        """Close the test's channel and drain the server."""
        await self.channel.close()
        await self.server.drain()

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.server.metrics_port)

    async def idle(self, timeout: float = 30) -> None:
        """Wait (bounded) until no request is in flight."""
        await self.until(
            lambda s: s.running == 0 and s.waiting == 0,
            timeout,
            already=lambda: self.engine.num_in_flight == 0,
        )

    async def until(
        self,
        condition: Callable[[StepStats], bool],
        timeout: float = 30,
        already: Callable[[], bool] = lambda: False,
    ) -> None:
        """Wait (bounded) for a step after which `condition` holds."""
        seen = threading.Event()

        def observe(stats: StepStats) -> None:
            if condition(stats):
                seen.set()

        self.engine.step_observers.append(observe)
        try:
            if already():  # checked after the observer is in place: no step can be missed
                return
            assert await asyncio.to_thread(seen.wait, timeout), "condition not reached"
        finally:
            self.engine.step_observers.remove(observe)


@contextlib.asynccontextmanager
async def not_serving_health() -> AsyncIterator[str]:
    """A bare health service on a free loopback port that answers NOT_SERVING for the
    server and the Generation service (a server loading or draining); yields its target."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        for service in ("", "treadle.v1.Generation"):
            await servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def start_served(
    tiny: LoadedModel,
    engine_config: EngineConfig | None = None,
    server_config: ServerConfig | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    plugins: PluginRegistry | None = None,
) -> Served:
    server = TreadleServer(
        server_config or ServerConfig(host="127.0.0.1", port=0, metrics_port=0, grace_period=5),
        "tiny-llama",
    )
    await server.start()
    engine = Engine(tiny, engine_config or EngineConfig(max_batch_rows=4, max_seq_len=256), plugins)
    await server.serve(engine)
    target = f"127.0.0.1:{server.port}"
    channel = (
        grpc.aio.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        if credentials
        else grpc.aio.insecure_channel(target)
    )
    return Served(server, engine, channel, pb_grpc.GenerationStub(channel))


async def start_secured(tiny: LoadedModel, tls: TlsFiles, token: str) -> Served:
    """A server requiring mutual TLS (client certificates signed by `tls.client_ca`)
    and the bearer `token`; its test channel presents the client certificate only."""
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        tls_client_ca=tls.client_ca,
        auth_token=token,
    )
    creds = grpc.ssl_channel_credentials(tls.ca.cert, tls.client.key, tls.client.cert)
    return await start_served(tiny, server_config=config, credentials=creds)


def greedy(
    prompt_ids: list[int], max_new: int, request_id: str = "", **kw: Any
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        token_ids=pb.TokenIds(ids=prompt_ids),
        stopping=pb.StoppingParameters(max_new_tokens=max_new, ignore_eos=True),
        **kw,
    )


async def read_rest(call: Any) -> list[Any]:
    """The remaining messages of a streaming call already read with `read()`."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def scrape_metrics(port: int) -> dict[str, float]:
    """Scrape /metrics on `port` and parse it with prometheus-client's own parser: each
    sample by `name{label=value,...}` (just `name` without labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
