"""The client side of the HTTP runs: workload items as streamed chat completions on one pool.

The HTTP counterpart of `grpc_client`: the same chat messages, budget, EOS
ignored and greedy choice, sent as `POST /v1/chat/completions` with
`"stream": true` to treadle's OpenAI-compatible frontend, read as server-sent
events with httpx, and checked the same way at the end (`traces.check_ending`).

Token accounting. A chunk carries text, not token ids, and a token that
releases no text (a special token the model picks once EOS is ignored, part of
a character) sends no chunk at all. So every request asks for `logprobs`
(no alternatives): then each engine token event is one chunk whose
`logprobs.content` lists its tokens, exactly the events a gRPC client sees,
and TTFT and inter-token gaps are taken the same way (`traces.take_trace`).
The price is the server's logprob of each chosen token (one log-softmax over
the step's logits) and one logprob entry per token in the JSON.
`stream_options.include_usage` adds the usage chunk the end is checked against.

Nothing here starts a server: every function takes an `httpx.AsyncClient`
(`http_client`), so the tests can point them at an in-process server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .run_result import BenchmarkError
from .traces import Ending, StreamFn, check_ending
from .workload import WorkItem

CHAT = "/v1/chat/completions"
BY_BUDGET = "length"  # OpenAI's finish_reason for "max_tokens reached"
TIMEOUT = httpx.Timeout(600.0, connect=30.0, pool=None)  # a 64-deep queue can wait long


def http_client(base_url: str, connections: int) -> httpx.AsyncClient:
    """One client for a whole run: a pool of `connections` kept-alive connections (one per
    closed-loop client, so no stream waits for a connection), no proxies from the environment."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=TIMEOUT, trust_env=False)


def chat_body(item: WorkItem, model: str, max_new_tokens: int | None = None) -> dict[str, Any]:
    """The request body of `item`: its chat, greedy, EOS ignored, its budget (or the one given),
    streamed with per-token logprobs (see the module docstring) and the final usage."""
    return {
        "model": model,
        "messages": item.as_dicts(),
        "max_tokens": item.max_new_tokens if max_new_tokens is None else max_new_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "logprobs": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def http_stream(client: httpx.AsyncClient, model: str) -> StreamFn:
    """A StreamFn over streamed chat completions: yields the token count of each token chunk.

    Raises BenchmarkError when the call is refused, the stream carries an
    error, or it does not end with finish_reason "length" and a usage of
    exactly the budget.
    """

    async def stream(item: WorkItem) -> AsyncIterator[int]:
        reason: str | None = None
        generated: int | None = None
        async for chunk in chat_chunks(client, item, chat_body(item, model)):
            for choice in chunk["choices"]:
                if tokens := len((choice.get("logprobs") or {}).get("content") or ()):
                    yield tokens
                reason = choice.get("finish_reason") or reason
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
        ending = None if reason is None else Ending(reason, reason == BY_BUDGET, generated)
        check_ending(item, ending)

    return stream


async def chat_chunks(
    client: httpx.AsyncClient, item: WorkItem, body: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of one streamed chat completion, until `data: [DONE]`.

    Raises BenchmarkError, naming `item`, on a status other than 200 or an
    `{"error": ...}` event.
    """
    try:
        async with client.stream("POST", CHAT, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise BenchmarkError(f"{item.id}: HTTP {response.status_code}: {text}")
            async for data in sse_data(response.aiter_lines()):
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchmarkError(f"{item.id}: error event: {chunk['error']}")
                yield chunk
    except httpx.HTTPError as exc:
        raise BenchmarkError(f"{item.id}: {type(exc).__name__}: {exc}") from exc


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event in `lines`, until `[DONE]` (or the end).

    An event's `data:` lines are joined with newlines; other fields and
    comments are skipped.
    """
    data: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            event, data = "\n".join(data), []
            if event == "[DONE]":
                return
            yield event


async def warm_up_http(client: httpx.AsyncClient, model: str, item: WorkItem) -> None:
    """One untimed 2-token request, as the other runs have (connection, chat template)."""
    async for _ in chat_chunks(client, item, chat_body(item, model, max_new_tokens=2)):
        pass


async def wait_ready(client: httpx.AsyncClient, timeout_s: float, poll_s: float = 0.1) -> None:
    """Poll `GET /ready` until 200 (the model is loaded and the frontend attached);
    TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                if (await client.get("/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(poll_s)


async def check_http_model(client: httpx.AsyncClient, model: str) -> None:
    """The frontend must serve `model` (`GET /v1/models`), the model the other runs use."""
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise BenchmarkError(f"GET /v1/models: HTTP {response.status_code}: {response.text}")
    served = [m["id"] for m in response.json()["data"]]
    if served != [model]:
        raise BenchmarkError(f"the HTTP frontend serves {served}, the in-process runs {model!r}")
