"""How the SDK reaches servers: targets and load balancing, TLS, metadata, retries."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .retry import RetryPolicy

HEALTH_SERVICE = "treadle.v1.Generation"
SERVICES = ["treadle.v1.Generation"]  # the methods the retry policy covers


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS (ca_cert) and, for mutual TLS, a client certificate and its key (PEM).

    Each is PEM bytes or a file path; files are read when the channel is
    made (when the client is built). `client_cert` and `client_key` go
    together: one without the other raises ValueError here. `server_name` is
    the name checked in the server's certificate; by default the host name of
    the target (of the first one, for a list of targets).
    """

    ca_cert: bytes | str | Path | None = None  # None: the system's roots
    client_cert: bytes | str | Path | None = None
    client_key: bytes | str | Path | None = None
    server_name: str | None = None  # override the name checked in the server certificate

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            given, missing = (
                ("client_cert", "client_key")
                if self.client_key is None
                else ("client_key", "client_cert")
            )
            raise ValueError(f"{missing}: required with {given} (mutual TLS needs both)")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials; raises ValueError for a file that is not the PEM expected."""
        return grpc.ssl_channel_credentials(
            _pem("ca_cert", self.ca_cert, b"CERTIFICATE-----"),
            _pem("client_key", self.client_key, b"PRIVATE KEY-----"),
            _pem("client_cert", self.client_cert, b"CERTIFICATE-----"),
        )


@dataclass(frozen=True)
class Connection:
    """Where and how to connect.

    `target` is "host:port", a gRPC target URI such as "dns:///name:port"
    (every address the name resolves to is used), or a list of "host:port"
    replicas. Calls are spread over the addresses with gRPC's own round_robin
    policy; a replica that goes away, or whose health is not SERVING, is
    skipped by new calls. gRPC retries refused calls per `retry`.
    """

    target: str | Sequence[str] = "localhost:50051"
    tls: TlsConfig | None = None
    token: str | None = None  # sent as "authorization: Bearer <token>"
    metadata: tuple[tuple[str, str], ...] = ()  # extra headers on every call
    options: tuple[tuple[str, int | str], ...] = field(default=())  # extra channel options
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def uri(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return "ipv4:" + ",".join(_ipv4(t) for t in self.target)

    def service_config(self, probe: bool = False) -> dict[str, object]:
        """The channel's service config; a `probe` channel has no health checking or retries."""
        config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
        if probe:
            return config
        # skip replicas whose health is not SERVING (loading or draining)
        config["healthCheckConfig"] = {"serviceName": HEALTH_SERVICE}
        config["methodConfig"] = [self.retry.method_config(SERVICES)]
        if self.retry.enabled:
            config["retryThrottling"] = self.retry.throttling()
        return config

    def channel_options(self, probe: bool = False) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.service_config", json.dumps(self.service_config(probe))),
            ("grpc.enable_retries", int(self.retry.enabled and not probe)),
        ]
        if (name := self.tls_server_name()) is not None:
            options.append(("grpc.ssl_target_name_override", name))
        return options + list(self.options)

    def tls_server_name(self) -> str | None:
        """The name checked in the server certificate, when gRPC would not check the host's."""
        if self.tls is None:
            return None
        if self.tls.server_name:
            return self.tls.server_name
        if isinstance(self.target, str) or not self.target:
            return None  # gRPC checks the host name of the target itself
        host = _host(self.target[0])  # the list is resolved to addresses: name the host
        return None if _is_ip(host) else host

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        auth = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        return auth + tuple(self.metadata)

    def aio_channel(self, probe: bool = False) -> grpc.aio.Channel:
        """A new asyncio channel (create it on the loop that will use it).

        A `probe` channel (for health checks) sees a server's own health
        status: no client-side health checking hides a NOT_SERVING server,
        and nothing is retried.
        """
        options = self.channel_options(probe)
        if self.tls is None:
            return grpc.aio.insecure_channel(self.uri(), options=options)
        return grpc.aio.secure_channel(self.uri(), self.tls.credentials(), options=options)


def _pem(name: str, value: bytes | str | Path | None, marker: bytes) -> bytes | None:
    if value is None:
        return None
    data = value if isinstance(value, bytes) else Path(value).read_bytes()
    if marker not in data:
        source = "" if isinstance(value, bytes) else f" ({value})"
        kind = "a private key" if b"KEY" in marker else "a certificate"
        raise ValueError(f"{name}{source}: is not {kind} in PEM form")
    return data


def _host(host_port: str) -> str:
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target: {host_port!r} is not host:port")
    return host.strip("[]")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ipv4(host_port: str) -> str:
    """Resolve "host:port" to "a.b.c.d:port" (gRPC's address lists take addresses only)."""
    port = host_port.rpartition(":")[2]
    return f"{socket.gethostbyname(_host(host_port))}:{port}"
