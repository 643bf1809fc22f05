"""The server: gRPC (Generation, grpc.health.v1, reflection), the OpenAI-compatible HTTP
frontend, /metrics; start, serve, drain.

Lifecycle:
  start()        bind the gRPC port (health answers NOT_SERVING, Generation
                 answers UNAVAILABLE), the HTTP port (/ready and the API answer
                 503) and the metrics port;
  serve(engine)  start the engine, warm it up, attach the metrics, then SERVING;
                 if the engine's step thread dies, health turns NOT_SERVING
                 and `failed` is set;
  lame_duck()    NOT_SERVING, refuse new requests (UNAVAILABLE; HTTP 503), let
                 running ones finish for the grace period, cancel the rest (each
                 gets its terminal event); both servers keep answering;
  close()        stop the HTTP and gRPC servers and release the ports;
  drain()        lame_duck() then close().

gRPC core cancels (CANCELLED) calls that reach a server while it stops, so a
process that must never answer CANCELLED ends after `lame_duck()` without
`close()`: the connections then drop and clients see UNAVAILABLE
(`serve_main` does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from treadle.v1 import treadle_pb2_grpc as pb_grpc

from ..scheduler.engine import Engine
from ..scheduler.generation_request import GenerationRequest
from .auth import BearerTokenInterceptor
from .call_tracker import CallTracker
from .http.app import HttpFrontend
from .http.listener import HttpListener, HttpTls
from .metrics import ServerMetrics
from .service import GenerationService, service_names

log = logging.getLogger("treadle.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


_FLUSH_S = 5.0  # after the engine drained: the least wait for open calls to send their last answer


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
    max_concurrent_streams: int | None = 256  # calls at once per client connection; None: no cap
    # The OpenAI-compatible HTTP frontend: None turns it off (the default in-process;
    # `treadle serve` listens on 8000 unless told otherwise); 0 picks a free port.
    http_port: int | None = None
    http_host: str | None = None  # None: the `host` value


class TreadleServer:
    """One gRPC server around one engine."""

    def __init__(self, config: ServerConfig, model_name: str) -> None:
        self.config = config
        self.metrics = ServerMetrics(model_name)
        self.service = GenerationService(self.metrics, config.max_request_bytes)
        self.http = HttpFrontend(self.metrics, config.max_request_bytes, config.auth_token)
        self.http_port: int | None = None  # the bound HTTP port, once started
        self._http_listener: HttpListener | None = None
        self.health = health.aio.HealthServicer()
        self.engine: Engine | None = None
        self.port = 0  # the bound gRPC port, once started
        self.metrics_port: int | None = None  # the bound metrics port, once started
        self.failed = asyncio.Event()  # set when the engine's step thread died
        self.calls = CallTracker()
        self._health_task: asyncio.Future[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http: Any = None

    async def start(self) -> None:
        """Bind the ports and start answering; health is NOT_SERVING until `serve`."""
        interceptors: list[grpc.aio.ServerInterceptor] = [self.calls]
        if self.config.auth_token:
            interceptors.append(BearerTokenInterceptor(self.config.auth_token))
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
        credentials = self._credentials()
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except (RuntimeError, OSError) as exc:
            raise ServerStartError(f"cannot listen on {address}: {exc}") from exc
        if self.port == 0:
            raise ServerStartError(f"cannot listen on {address}: the port is taken")
        if self.config.http_port is not None:
            self._start_http()
        await server.start()
        self._server = server
        if self.config.metrics_port is not None:
            self._start_metrics()
        if self.config.auth_token and credentials is None:
            log.warning(
                "a bearer token is required but TLS is off: the token crosses the network "
                "in clear text (set --tls-cert and --tls-key)"
            )
        metrics = (
            f", metrics on {self.config.metrics_host}:{self.metrics_port}/metrics"
            if self.metrics_port is not None
            else ""
        )
        log.info(
            "listening on %s:%d (%s)%s", self.config.host, self.port, self._security(), metrics
        )
        if self._http_listener is not None:
            log.info(
                "OpenAI-compatible HTTP on %s:%d (%s)",
                self._http_listener.host,
                self.http_port,
                "HTTPS" if self.config.tls_cert else "plain HTTP",
            )

    async def serve(self, engine: Engine) -> None:
        """Start `engine`, warm it up, attach the metrics, then report SERVING.

        The warm-up request is not counted in the metrics. If the engine's
        step thread dies later (`Engine.on_fatal`), health turns NOT_SERVING,
        new calls get UNAVAILABLE and `failed` is set.
        """
        self.engine = engine
        loop = asyncio.get_running_loop()
        on_fatal: list[Callable[[BaseException], None]] | None = getattr(engine, "on_fatal", None)
        if on_fatal is not None:
            on_fatal.append(lambda exc: _call_soon(loop, self._engine_died, exc))
        engine.start()
        await _warm_up(engine)
        self.metrics.attach(engine)  # after the warm-up: nobody has called yet
        self.service.engine = engine
        await self.http.attach(engine)
        if self.failed.is_set():  # died during the warm-up
            return
        await self._set_health(SERVING)
        log.info("serving %s", engine.info.model)

    async def lame_duck(self) -> None:
        """NOT_SERVING and UNAVAILABLE for new calls; running ones finish within the grace period.

        Requests still running when the grace period ends are cancelled, each
        with its terminal event (UNAVAILABLE). Then it waits for the calls
        that were open when it began (e.g. a Session with nothing running) to
        end: until the grace period ends, and at least 5 s after the engine
        stopped. The gRPC server keeps answering afterwards (health
        NOT_SERVING, calls UNAVAILABLE).
        """
        if self.engine is not None:
            self.engine.stop_accepting()  # first: nothing is admitted once NOT_SERVING shows
        await self._set_health(NOT_SERVING)
        answering = self.calls.snapshot()
        answering_http = self.http.requests.snapshot()
        grace = 0.0 if self.failed.is_set() else self.config.grace_period
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + grace
        if self.engine is not None:
            log.info("draining: %d requests in flight", self.engine.num_in_flight)
            await asyncio.to_thread(self.engine.stop, grace)
        # Every request has its terminal event; the calls open at the start (a Session, say)
        # may go on until the grace period ends, and get at least _FLUSH_S to send their last.
        flush = max(_FLUSH_S, grace_ends - loop.time())
        closed = await asyncio.gather(
            self.calls.wait_closed(answering, flush),
            self.http.requests.wait_closed(answering_http, flush),
        )
        if not all(closed):
            log.warning("calls still open %.0f s after the drain; they end now", flush)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        log.info("drained")

    async def close(self) -> None:
        """Stop the HTTP and gRPC servers and release the ports (gRPC calls arriving
        meanwhile may be CANCELLED)."""
        if self._http_listener is not None:
            await self._http_listener.close()
            self._http_listener = None
        if self._server is not None:
            await self._server.stop(grace=2.0)
            self._server = None
        log.info("stopped")

    async def drain(self) -> None:
        """`lame_duck()`, then `close()`: for in-process use, where the port must be released."""
        await self.lame_duck()
        await self.close()

    def _engine_died(self, exc: BaseException) -> None:
        """On the event loop: the step thread died; stop admitting and report NOT_SERVING."""
        log.error("the engine's step thread died (%s): NOT_SERVING", exc)
        if self.engine is not None:
            self.engine.stop_accepting()
        self.failed.set()
        self._health_task = asyncio.ensure_future(self._set_health(NOT_SERVING))

    # -- helpers ------------------------------------------------------------------------
    def _options(self) -> list[tuple[str, int]]:
        options = [
            ("grpc.max_receive_message_length", self.config.max_request_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
        ]
        if self.config.max_concurrent_streams:
            # Calls beyond this on one connection wait in the client until one ends.
            options.append(("grpc.max_concurrent_streams", self.config.max_concurrent_streams))
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
        pair = (
            _read_pem(c.tls_key, "--tls-key", b"PRIVATE KEY", "a private key"),
            _read_pem(c.tls_cert, "--tls-cert", b"BEGIN CERTIFICATE", "a certificate"),
        )
        client_ca = (
            _read_pem(c.tls_client_ca, "--tls-client-ca", b"BEGIN CERTIFICATE", "a certificate")
            if c.tls_client_ca
            else None
        )
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def _security(self) -> str:
        """How callers must connect, for the start-up log line."""
        c = self.config
        parts = ["TLS" if c.tls_cert else "plaintext"]
        if c.tls_client_ca:
            parts.append("client certificates required")
        if c.auth_token:
            parts.append("bearer token required")
        return ", ".join(parts)

    def _start_http(self) -> None:
        """Bind the HTTP port (TLS and client certificates as for gRPC) and start serving."""
        c = self.config
        assert c.http_port is not None
        host = c.http_host or c.host
        self._credentials()  # the TLS settings are checked as for gRPC, naming the flags
        tls = HttpTls(c.tls_cert, c.tls_key, c.tls_client_ca) if c.tls_cert and c.tls_key else None
        listener = HttpListener(self.http.app, host, c.http_port, tls)
        try:
            listener.start()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            where = f"{host}:{c.http_port}"
            raise ServerStartError(f"cannot listen for HTTP on {where}: {exc}") from exc
        self._http_listener = listener
        self.http_port = listener.port

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


def _call_soon(
    loop: asyncio.AbstractEventLoop, fn: Callable[[BaseException], None], exc: BaseException
) -> None:
    """Run `fn(exc)` on `loop` from another thread; nothing if the loop is already closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, exc)


def _read_pem(path: Path, flag: str, marker: bytes, what: str) -> bytes:
    """The PEM file given by `flag`; ServerStartError naming the flag when it is not `what`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ServerStartError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from exc
    if marker not in data:
        hint = (
            " (it holds a private key: are --tls-cert and --tls-key swapped?)"
            if b"PRIVATE KEY" in data
            else " (it holds a certificate: are --tls-cert and --tls-key swapped?)"
            if b"BEGIN CERTIFICATE" in data
            else ""
        )
        raise ServerStartError(f"{flag}: {path} is not {what} in PEM format{hint}")
    return data


async def _warm_up(engine: Engine) -> None:
    """One tiny request through the whole path, so the first client pays no first-call costs."""
    eos_ids = engine.info.eos_token_ids
    eos = eos_ids[0] if eos_ids else 0
    warm = GenerationRequest(prompt_token_ids=[eos], max_new_tokens=2, ignore_eos=True)
    async for _ in engine.generate(warm):
        pass
