"""uvicorn on treadle's own event loop, beside grpc.aio: its socket, TLS, start and stop.

The socket is bound here, before uvicorn starts, so a port in use fails the start with a
clear message and port 0 is known at once. uvicorn's own signal handling is off: treadle's
drain owns SIGTERM (serve_main.py), and a draining process never stops the listener (new
requests get 503 until the process exits, as gRPC answers UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

_STOP_S = 2  # `close`: seconds open connections get to finish before they are dropped


@dataclass(frozen=True)
class HttpTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # client certificates must chain to it (mutual TLS)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the process's drain owns the signals)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    """One HTTP(S) listener serving an ASGI app on the running event loop."""

    def __init__(self, app: ASGIApp, host: str, port: int, tls: HttpTls | None) -> None:
        self.host = host
        self.port = port  # the bound port once started (0 picks one)
        self._config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # treadle's logging stays as it is
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=_STOP_S,
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        self._server = _Server(self._config)
        self._task: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Bind the port and start serving (raises OSError when the port cannot be bound,
        ssl.SSLError or OSError when the TLS files cannot be used)."""
        sock = _bound_socket(self.host, self.port)
        try:
            self._config.load()  # builds the TLS context: bad files fail here
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))

    async def close(self) -> None:
        """Stop listening; open connections get a moment to finish."""
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None


def _bound_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to `host:port` (IPv4 or IPv6)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
