"""The HTTP frontend with the gRPC service's TLS settings, and response_format over HTTP.

`--tls-cert`/`--tls-key` serve both ports over TLS: the openai client reaches the HTTP
port over HTTPS trusting the test CA, and plain HTTP is not answered. A json_schema
response_format travels over HTTP to the same grammar engine as over gRPC.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from e2e.openai_server import OpenAIServer, start_openai_server
from e2e.test_serve_process import save_tiny_model
from tls_certs import TlsFiles, make_tls

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: Any, tls: TlsFiles
) -> Iterator[OpenAIServer]:
    model_dir = save_tiny_model(tmp_path_factory.mktemp("model"), tokenizer)
    tls_args = ("--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key))
    server = start_openai_server(model_dir, *tls_args)
    try:
        yield server
    finally:
        assert server.terminate() == 0


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def test_https_with_the_same_certificate_and_json_schema(
    secured: OpenAIServer, tls: TlsFiles, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tls.ca.cert)
    base = f"https://127.0.0.1:{secured.http_port}/v1"
    with httpx.Client(verify=trusting(ca), timeout=60) as http:
        client = openai.OpenAI(base_url=base, api_key="unused", http_client=http, max_retries=0)
        answer = client.chat.completions.create(
            model=secured.model,
            messages=[{"role": "user", "content": "Give me JSON."}],
            max_tokens=60,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": SCHEMA},
            },
        )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"  # the format was complete
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
        httpx.get(f"http://127.0.0.1:{secured.http_port}/health", timeout=10)
    with pytest.raises(httpx.ConnectError):  # nor HTTPS to a client that trusts another CA
        other = tmp_path / "other.pem"
        other.write_bytes(tls.other_ca.cert)
        httpx.get(f"https://127.0.0.1:{secured.http_port}/health", verify=trusting(other))
