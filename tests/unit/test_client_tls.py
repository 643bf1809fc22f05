"""TlsConfig and the TLS server name, checked before any channel exists."""

from __future__ import annotations

import pytest

from treadle.client import TlsConfig
from treadle.client.connection import Connection

OVERRIDE = "grpc.ssl_target_name_override"


def test_a_client_cert_needs_its_key_and_the_reverse() -> None:
    with pytest.raises(ValueError, match="client_key: required with client_cert"):
        TlsConfig(ca_cert=b"ca", client_cert=b"cert")
    with pytest.raises(ValueError, match="client_cert: required with client_key"):
        TlsConfig(client_key=b"key")


def test_files_that_are_not_the_pem_expected_are_named() -> None:
    bad = TlsConfig(ca_cert=b"-----BEGIN CERTIFICATE-----", client_cert=b"x", client_key=b"y")
    with pytest.raises(ValueError, match="client_key: is not a private key"):
        bad.credentials()


def test_a_list_of_targets_checks_the_host_name_given() -> None:
    tls = TlsConfig()
    listed = dict(Connection(["localhost:1", "localhost:2"], tls=tls).channel_options())
    assert listed[OVERRIDE] == "localhost"  # not the addresses the list resolves to
    named = dict(Connection(["localhost:1"], tls=TlsConfig(server_name="a.b")).channel_options())
    assert named[OVERRIDE] == "a.b"
    assert OVERRIDE not in dict(Connection("localhost:1", tls=tls).channel_options())
    assert OVERRIDE not in dict(Connection(["127.0.0.1:1"], tls=tls).channel_options())
