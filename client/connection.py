"""How the SDK reaches servers: targets and load balancing, TLS, metadata."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

HEALTH_SERVICE = "treadle.v1.Generation"


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS (ca_cert) and, for mutual TLS, a client certificate and key (PEM)."""

    ca_cert: bytes | str | Path | None = None  # None: the system's roots
    client_cert: bytes | str | Path | None = None
    client_key: bytes | str | Path | None = None
    server_name: str | None = None  # override the name checked in the server certificate

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            _pem(self.ca_cert), _pem(self.client_key), _pem(self.client_cert)
        )


@dataclass(frozen=True)
class Connection:
    """Where and how to connect.

    `target` is "host:port", a gRPC target URI such as "dns:///name:port"
    (every address the name resolves to is used), or a list of "host:port"
    replicas. Calls are spread over the addresses with gRPC's own round_robin
    policy; a replica that goes away is skipped by new calls.
    """

    target: str | Sequence[str] = "localhost:50051"
    tls: TlsConfig | None = None
    token: str | None = None  # sent as "authorization: Bearer <token>"
    metadata: tuple[tuple[str, str], ...] = ()  # extra headers on every call
    options: tuple[tuple[str, int | str], ...] = field(default=())  # extra channel options

    def uri(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return "ipv4:" + ",".join(_ipv4(t) for t in self.target)

    def channel_options(self) -> list[tuple[str, int | str]]:
        config: dict[str, object] = {
            "loadBalancingConfig": [{"round_robin": {}}],
            # skip replicas whose health is not SERVING (loading or draining)
            "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
        }
        options: list[tuple[str, int | str]] = [("grpc.service_config", json.dumps(config))]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options + list(self.options)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        auth = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        return auth + tuple(self.metadata)

    def aio_channel(self) -> grpc.aio.Channel:
        """A new asyncio channel (create it on the loop that will use it)."""
        if self.tls is None:
            return grpc.aio.insecure_channel(self.uri(), options=self.channel_options())
        return grpc.aio.secure_channel(
            self.uri(), self.tls.credentials(), options=self.channel_options()
        )


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _ipv4(host_port: str) -> str:
    """Resolve "host:port" to "a.b.c.d:port" (gRPC's address lists take addresses only)."""
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target: {host_port!r} is not host:port")
    return f"{socket.gethostbyname(host)}:{port}"
