"""The gRPC server: Generation, grpc.health.v1, reflection, /metrics; start, serve, drain.

Lifecycle:
  start()        bind the gRPC port (health answers NOT_SERVING, Generation
                 answers UNAVAILABLE) and the metrics port;
  serve(engine)  attach the engine, start it, warm it up, then SERVING;
  drain()        NOT_SERVING, refuse new requests (UNAVAILABLE), let running
                 ones finish for the grace period, cancel the rest (each gets
                 its terminal event), stop the server.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from treadle.v1 import treadle_pb2_grpc as pb_grpc

from .auth import BearerTokenInterceptor
from .engine import Engine
from .generation_request import GenerationRequest
from .metrics import ServerMetrics
from .service import GenerationService, service_names

log = logging.getLogger("treadle.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServerStartError(RuntimeError):
    """The server could not start (port taken, bad TLS files, ...); the message says why."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051  # 0 picks a free port
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9090  # None: no metrics endpoint; 0 picks a free port
    grace_period: float = 30.0  # seconds running requests get to finish on shutdown
    max_request_bytes: int = 4 * 2**20  # largest request message accepted
    tls_cert: Path | None = None  # server certificate (PEM); with tls_key enables TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # CA for client certificates: enables mutual TLS
    auth_token: str | None = None  # bearer token required on every call but health
    max_connection_age: float | None = 300.0  # seconds; clients then reconnect and re-resolve


class TreadleServer:
    """One gRPC server around one engine."""

    def __init__(self, config: ServerConfig, model_name: str) -> None:
        self.config = config
        self.metrics = ServerMetrics(model_name)
        self.service = GenerationService(self.metrics, config.max_request_bytes)
        self.health = health.aio.HealthServicer()
        self.engine: Engine | None = None
        self.port = 0  # the bound gRPC port, once started
        self.metrics_port: int | None = None  # the bound metrics port, once started
        self._server: grpc.aio.Server | None = None
        self._metrics_http: Any = None

    async def start(self) -> None:
        """Bind the ports and start answering; health is NOT_SERVING until `serve`."""
        interceptors = (
            [BearerTokenInterceptor(self.config.auth_token)] if self.config.auth_token else []
        )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=self._options(),
        )
        pb_grpc.add_GenerationServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*service_names(), health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        try:
            credentials = self._credentials()
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except (RuntimeError, OSError) as exc:
            raise ServerStartError(f"cannot listen on {address}: {exc}") from exc
        if self.port == 0:
            raise ServerStartError(f"cannot listen on {address}: the port is taken")
        await server.start()
        self._server = server
        if self.config.metrics_port is not None:
            self._start_metrics()
        log.info(
            "listening on %s:%d (%s)%s",
            self.config.host,
            self.port,
            "TLS" if self.config.tls_cert else "plaintext",
            f", metrics on :{self.metrics_port}/metrics" if self.metrics_port is not None else "",
        )

    async def serve(self, engine: Engine) -> None:
        """Attach and start `engine`, warm it up, then report SERVING."""
        self.engine = engine
        self.metrics.attach(engine)
        engine.start()
        await _warm_up(engine)
        self.service.engine = engine
        await self._set_health(SERVING)
        log.info("serving %s", engine.loaded.name)

    async def drain(self) -> None:
        """Stop taking requests, let running ones finish (grace period), then stop."""
        if self.engine is not None:
            self.engine.stop_accepting()  # first: nothing is admitted once NOT_SERVING shows
        await self._set_health(NOT_SERVING)
        if self.engine is not None:
            log.info("draining: %d requests in flight", self.engine.num_in_flight)
            await asyncio.to_thread(self.engine.stop, self.config.grace_period)
        if self._server is not None:
            await self._server.stop(grace=2.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")

    # -- helpers ------------------------------------------------------------------------
    def _options(self) -> list[tuple[str, int]]:
        options = [
            ("grpc.max_receive_message_length", self.config.max_request_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
        ]
        if self.config.max_connection_age:
            # Clients reconnect after this long (streams in progress finish first) and so
            # re-resolve a dns:/// target: new replicas get their share of old clients.
            options.append(
                ("grpc.max_connection_age_ms", int(self.config.max_connection_age * 1000))
            )
        return options

    async def _set_health(self, status: Any) -> None:
        for name in ("", *service_names()):
            await self.health.set(name, status)

    def _credentials(self) -> grpc.ServerCredentials | None:
        c = self.config
        if c.tls_cert is None and c.tls_key is None:
            if c.tls_client_ca is not None:
                raise ServerStartError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if c.tls_cert is None or c.tls_key is None:
            raise ServerStartError("TLS needs both --tls-cert and --tls-key")
        try:
            pair = (c.tls_key.read_bytes(), c.tls_cert.read_bytes())
            client_ca = c.tls_client_ca.read_bytes() if c.tls_client_ca else None
        except OSError as exc:
            raise ServerStartError(f"cannot read a TLS file: {exc}") from exc
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def _start_metrics(self) -> None:
        assert self.config.metrics_port is not None
        try:
            httpd, _ = start_http_server(
                self.config.metrics_port, self.config.metrics_host, self.metrics.registry
            )
        except OSError as exc:
            where = f"{self.config.metrics_host}:{self.config.metrics_port}"
            raise ServerStartError(f"cannot serve metrics on {where}: {exc}") from exc
        self._metrics_http = httpd
        self.metrics_port = int(httpd.server_port)


async def _warm_up(engine: Engine) -> None:
    """One tiny request through the whole path, so the first client pays no first-call costs."""
    eos = engine.loaded.eos_token_ids[0] if engine.loaded.eos_token_ids else 0
    warm = GenerationRequest(prompt_token_ids=[eos], max_new_tokens=2, ignore_eos=True)
    async for _ in engine.generate(warm):
        pass
