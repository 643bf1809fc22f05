"""Throwaway certificates for the TLS tests: a CA, a server cert for localhost, a client cert."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, issuer: Pem | None, server: bool = False) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_key = serialization.load_pem_private_key(issuer.key, None) if issuer else key
    issuer_name = x509.load_pem_x509_certificate(issuer.cert).subject if issuer else _name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return Pem(
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass(frozen=True)
class TlsFiles:
    ca: Pem
    other_ca: Pem  # a CA nobody trusts
    server: Pem
    client: Pem
    server_cert: Path
    server_key: Path
    client_ca: Path


def make_tls(tmp: Path) -> TlsFiles:
    ca = _issue("treadle test CA", None)
    other = _issue("some other CA", None)
    server = _issue("localhost", ca, server=True)
    client = _issue("test client", ca)
    (tmp / "server.pem").write_bytes(server.cert)
    (tmp / "server.key").write_bytes(server.key)
    (tmp / "ca.pem").write_bytes(ca.cert)
    return TlsFiles(
        ca, other, server, client, tmp / "server.pem", tmp / "server.key", tmp / "ca.pem"
    )
