"""The OpenAI-compatible HTTP API of a real `treadle serve`, through the official `openai`
client (sync and async), raw HTTP and curl: issue 13.

One server process (the tiny random model) serves the module; the auth and queue-full
tests start their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from e2e.openai_server import OpenAIServer, start_openai_server
from e2e.served import scrape_metrics
from e2e.test_drain import GATE_FD, Gate, step_gate
from e2e.test_serve_process import save_tiny_model
from openai.types.chat import ChatCompletionMessageParam

from treadle.v1 import treadle_pb2 as pb
from treadle.v1 import treadle_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def gate() -> Iterator[Gate]:
    """Steps of requests that enable the `step_gate` plugin wait for the test."""
    with step_gate() as g:
        yield g


QUESTION = "What is the capital of France?"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}
# a 1x1 PNG
TINY_PNG_HEX = (
    "89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
    "53de0000000c4944415478da63f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("openai") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[OpenAIServer]:
    s = start_openai_server(model_dir)
    try:
        yield s
    finally:
        assert s.terminate() == 0


@pytest.fixture
def client(server: OpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


def chat_text(client: openai.OpenAI, model: str, **kw: Any) -> str:
    answer = client.chat.completions.create(model=model, messages=CHAT, **kw)
    return str(answer.choices[0].message.content)


def metrics(server: OpenAIServer) -> dict[str, float]:
    return scrape_metrics(server.metrics_port)


# -- chat and completions -------------------------------------------------------------------
def test_chat_sync_and_async_agree(server: OpenAIServer, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=8, **GREEDY
    )
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == server.model
    assert answer.id.startswith("chatcmpl-") and answer.system_fingerprint
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 8
    assert answer.usage.prompt_tokens_details is not None

    async def again() -> str:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            other = await c.chat.completions.create(
                model=server.model, messages=CHAT, max_tokens=8, **GREEDY
            )
            return str(other.choices[0].message.content)

    assert asyncio.run(again()) == choice.message.content


async def test_chat_stream_with_usage_equals_the_whole_answer(
    server: OpenAIServer, client: openai.OpenAI
) -> None:
    whole = chat_text(client, server.model, max_tokens=12, **GREEDY)
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model=server.model,
            messages=CHAT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_whole_and_streamed(server: OpenAIServer, client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": server.model, "max_tokens": 6, **GREEDY}
    whole = client.completions.create(prompt="Once upon a time", **kw)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    streamed = client.completions.create(prompt="Once upon a time", stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    batch = client.completions.create(prompt=["Once upon a time", "Hello"], **kw)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == whole.choices[0].text
    assert batch.usage is not None and batch.usage.completion_tokens == 12
    ids = client.completions.create(prompt=[101, 2045, 3310], **kw)
    assert ids.usage is not None and ids.usage.prompt_tokens == 3


def test_two_samples(server: OpenAIServer, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=5, n=2, seed=3, temperature=1.0
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage is not None and answer.usage.completion_tokens <= 10
    streamed = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=5, n=2, seed=3, temperature=1.0, stream=True
    )
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in answer.choices]  # seeded: the same samples


def test_logprobs_with_top_logprobs(server: OpenAIServer, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.bytes is not None and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the top one
    raw = b"".join(bytes(e.bytes or []) for e in content)
    assert raw.decode("utf-8", errors="replace") == choice.message.content

    legacy = client.completions.create(
        model=server.model, prompt="Hello", max_tokens=4, logprobs=2, **GREEDY
    )
    lp = legacy.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 4
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset is not None and lp.text_offset[0] == 0


def test_stop_string_ends_the_text(server: OpenAIServer, client: openai.OpenAI) -> None:
    full = chat_text(client, server.model, max_tokens=16, **GREEDY)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    answer = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=16, stop=[stop], **GREEDY
    )
    assert answer.choices[0].message.content == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_seed_reproducible(server: OpenAIServer, client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 10, "temperature": 1.0, "top_p": 0.95}
    first = chat_text(client, server.model, seed=1234, **kw)
    assert chat_text(client, server.model, seed=1234, **kw) == first


def test_models_health_and_ready(server: OpenAIServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [server.model]
    assert httpx.get(f"{server.root}/health", timeout=10).status_code == 200
    ready = httpx.get(f"{server.root}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"status": "SERVING"}


def test_a_named_tool_choice_returns_a_call(server: OpenAIServer, client: openai.OpenAI) -> None:
    tool: dict[str, Any] = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    named: dict[str, Any] = {"type": "function", "function": {"name": "get_weather"}}
    answer = client.chat.completions.create(
        model=server.model,
        messages=CHAT,
        tools=[tool],
        tool_choice=named,
        max_tokens=64,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    streamed = client.chat.completions.create(
        model=server.model,
        messages=CHAT,
        tools=[tool],
        tool_choice=named,
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in streamed if c.choices]
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]
    assert [c.function.arguments for c in calls if c.function] == [call.function.arguments]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- errors ----------------------------------------------------------------------------------
def test_errors_are_the_clients_typed_exceptions(
    server: OpenAIServer, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=server.model, messages=CHAT, n=0)
    assert bad.value.param == "n" and bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model=server.model, messages=CHAT, extra_body={"best_of_luck": 1}
        )
    assert unknown.value.param == "best_of_luck"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=10**6)
    assert too_long.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as image:
        client.chat.completions.create(
            model=server.model,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ],
        )
    assert image.value.param == "messages[0].content[0]"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-none", messages=CHAT)
    assert missing.value.code == "model_not_found"


def test_an_image_reaches_the_engine_and_a_url_is_refused(
    server: OpenAIServer, client: openai.OpenAI
) -> None:
    """A data: URL image is decoded into the request and reaches the engine, which refuses
    it for the tiny text-only model naming the part; the server fetches no http(s) URL."""
    png = base64.b64encode(bytes.fromhex(TINY_PNG_HEX)).decode()
    for url, param in (
        (f"data:image/png;base64,{png}", "messages[0].content[1]"),  # the engine's refusal
        ("https://example.com/cat.png", "messages[0].content[1]"),  # refused at the door
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=server.model,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is in the picture?"},
                            {"type": "image_url", "image_url": {"url": url}},
                        ],
                    }
                ],
                max_tokens=4,
            )
        assert (refused.value.status_code, refused.value.param) == (400, param), url
    assert "fetches no URL" in refused.value.message


@pytest.fixture
def guarded(model_dir: Path, tmp_path: Path, gate: Gate) -> Iterator[OpenAIServer]:
    """A server that wants a bearer token, runs one request at a time and queues one more;
    requests that enable `step_gate` take each step only when the test lets them."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    tests_dir = str(REPO / "tests")
    s = start_openai_server(
        model_dir,
        *("--auth-token-file", str(token_file), "--max-batch-rows", "1", "--max-waiting", "1"),
        *("--plugin", "step_gate=e2e.test_drain:StepGate"),
        env={"PYTHONPATH": tests_dir, GATE_FD: str(gate.read_fd)},
        pass_fds=(gate.read_fd,),
    )
    try:
        yield s
    finally:
        gate.open()
        assert s.terminate() == 0


def test_auth_and_a_full_queue(guarded: OpenAIServer, gate: Gate) -> None:
    with (
        openai.OpenAI(base_url=guarded.base_url, api_key="wrong", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.models.list()
    missing = httpx.get(f"{guarded.base_url}/models", timeout=10)  # no Authorization header
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded.root}/ready", timeout=10).status_code == 200  # no token needed
    gated: dict[str, Any] = {
        "model": guarded.model,
        "messages": CHAT,
        "max_tokens": 3,
        "logprobs": True,  # every token makes a chunk, even while its text is held back
        "stream": True,
        "extra_body": {"ignore_eos": True, "plugins": [{"name": "step_gate"}]},
    }
    with openai.OpenAI(base_url=guarded.base_url, api_key="s3cret", max_retries=0) as c:
        assert [m.id for m in c.models.list()] == [guarded.model]
        running = iter(c.chat.completions.create(**gated))
        assert next(running).choices[0].delta.role == "assistant"
        gate.allow(1)
        assert next(running).choices[0].logprobs is not None  # its first step ran: it runs
        waiting = iter(c.chat.completions.create(**gated))
        assert next(waiting).choices[0].delta.role == "assistant"  # queued behind it
        with pytest.raises(openai.RateLimitError) as full:
            c.chat.completions.create(model=guarded.model, messages=CHAT, max_tokens=2)
        gate.open()
        for stream in (running, waiting):
            assert [ch.choices[0].finish_reason for ch in stream if ch.choices][-1] == "length"
    assert full.value.response.headers["retry-after"] == "1"
    counts = metrics(guarded)
    assert counts["treadle_frontend_errors_total{code=UNAUTHENTICATED,frontend=http}"] == 2
    assert counts["treadle_frontend_errors_total{code=RESOURCE_EXHAUSTED,frontend=http}"] == 1


# -- the same engine as gRPC ------------------------------------------------------------------
def test_greedy_text_over_http_equals_grpc(server: OpenAIServer, client: openai.OpenAI) -> None:
    http_text = chat_text(client, server.model, max_tokens=16, **GREEDY)
    request = pb.GenerateRequest(
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=QUESTION)]),
        stopping=pb.StoppingParameters(max_new_tokens=16, ignore_eos=True),
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        answer = pb_grpc.GenerationStub(channel).Generate(request, timeout=60)
    assert answer.text == http_text
    counts = metrics(server)
    assert counts["treadle_frontend_requests_total{frontend=grpc}"] >= 1
    assert counts["treadle_frontend_requests_total{frontend=http}"] >= 1


def test_the_curl_example_of_the_docs_runs(server: OpenAIServer) -> None:
    doc = (REPO / "docs" / "openai.md").read_text()
    block = re.search(r"```bash\n(curl [^`]*?)```", doc)
    assert block is not None, "docs/openai.md has no curl example"
    command = block.group(1).replace("\\\n", " ")
    command = command.replace("localhost:8000", f"127.0.0.1:{server.http_port}")
    command = command.replace("SmolLM2-135M-Instruct", server.model)
    done = subprocess.run(
        shlex.split(command), capture_output=True, text=True, timeout=60, check=True
    )
    answer = json.loads(done.stdout)
    assert answer["object"] == "chat.completion", answer
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
