"""The client verbs of the `treadle` command: generate, chat, info, health."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from ..api.outcome import TokenLogprob
from ..api.params import ChatMessage, GenerationParams
from ..api.tools import ToolCall
from .cli import params_from_args
from .connection import TlsConfig
from .convert import Prompt
from .errors import TreadleClientError, Unauthenticated
from .image_flags import user_message
from .results import Finish, Result, TokenChunk
from .streams import raise_if_error
from .sync_client import Client
from .tool_flags import ToolFlags, print_calls


def client_from_args(args: argparse.Namespace) -> Client:
    token = os.environ.get("TREADLE_TOKEN") or None
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = TlsConfig(
            ca_cert=args.tls_ca,
            client_cert=args.tls_cert,
            client_key=args.tls_key,
            server_name=args.tls_server_name,
        )
    targets = args.target.split(",")
    return Client(
        targets if len(targets) > 1 else args.target, tls=tls, token=token, timeout=args.timeout
    )


def generate(args: argparse.Namespace) -> int:
    """Stream one answer to stdout, then its tool calls (one JSON line each); the finish
    line goes to stderr. With -n N > 1, print each sample once all have finished,
    labelled `[sample i]`. With --image, the prompt is a user message holding the
    images, then the text."""
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [*_opening(args.system), user_message(prompt_text, args.images)]
    tools: ToolFlags = args.tool_flags
    as_chat = args.chat or args.system or tools.given or args.images
    prompt: Prompt = messages if as_chat else prompt_text
    try:
        with client_from_args(args) as client:
            params = params_from_args(args)
            if args.json:
                result = client.generate(
                    prompt, params=params, tools=tools.tools, tool_choice=tools.choice
                )
                print(json.dumps(_result_json(result), default=_plain, indent=2))
                return 0
            if params.n > 1:
                _print_samples(_gather_samples(client, prompt, params, tools))
                return 0
            logprobs: list[tuple[str, TokenLogprob]] = []
            _, finish = _print_answer(client, prompt, params, tools, logprobs)
    except (TreadleClientError, OSError, ValueError) as exc:
        print(f"treadle generate: {exc}", file=sys.stderr)
        return 1
    print(file=sys.stdout, flush=True)
    print_calls(finish.tool_calls if finish else ())
    _print_logprobs(logprobs)
    _print_finish(finish)
    return 0


def chat(args: argparse.Namespace) -> int:
    """An interactive conversation; Ctrl-C stops the current answer, Ctrl-D leaves.

    With --tools, an answer's calls are printed after its text (one JSON line each)
    and the result of each is asked for (`[name id] result> `); the model then
    answers again with the results, until it answers without calls. The --image
    files go with the first question (and are forgotten with it if it fails or is
    stopped).

    Exits 1 if any question failed (at once for a refused token: every later
    question would fail the same way), 0 otherwise.
    """
    # Ctrl-C stops an answer even when the chat was started with SIGINT ignored (a shell
    # without job control starts background commands so, and children inherit it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    messages = _opening(args.system)
    images = list(args.images)  # for the next question
    failed = False
    try:
        client = client_from_args(args)
        params = params_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"treadle chat: {exc}", file=sys.stderr)
        return 1
    with client:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 1 if failed else 0
            except KeyboardInterrupt:  # at the prompt: a fresh line
                print(file=sys.stderr)
                continue
            if not line.strip():
                continue
            turn = len(messages)  # where this question's messages start
            messages.append(user_message(line, images))
            images = []
            try:
                answered = _chat_turn(client, messages, params, args.tool_flags)
            except TreadleClientError as exc:
                print(f"\n[error: {exc}]", file=sys.stderr, flush=True)
                if isinstance(exc, Unauthenticated):
                    return 1
                failed = True
                answered = False
            if not answered:  # failed or cancelled: forget the question
                del messages[turn:]


def info(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            model = client.model_info()
    except TreadleClientError as exc:
        print(f"treadle info: {exc}", file=sys.stderr)
        return 1
    for key, value in dataclasses.asdict(model).items():
        shown = ", ".join(str(v) for v in value) if isinstance(value, tuple | list) else value
        print(f"{key}: {shown}")
    return 0


def health(args: argparse.Namespace) -> int:
    """Print the health status; exit 0 only when SERVING."""
    try:
        with client_from_args(args) as client:
            status = client.health()
    except TreadleClientError as exc:
        print(f"UNREACHABLE: {exc}")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _opening(system: str | None) -> list[ChatMessage]:
    return [ChatMessage("system", system)] if system else []


def _print_answer(
    client: Client,
    prompt: Prompt,
    params: GenerationParams,
    tools: ToolFlags,
    logprobs: list[tuple[str, TokenLogprob]] | None = None,
) -> tuple[str, Finish | None]:
    """Stream one answer to stdout; raises the typed error of a request that ends in ERROR.

    Each token's logprobs (with its chunk's text) are appended to `logprobs`.
    """
    parts: list[str] = []
    # not kept in a local: the traceback of an error raised here would keep the stream
    # (and its call) alive past the client's close
    for event in client.stream(prompt, params=params, tools=tools.tools, tool_choice=tools.choice):
        if isinstance(event, TokenChunk):
            parts.append(event.text)
            print(event.text, end="", flush=True)
            if logprobs is not None:
                logprobs.extend((event.text, lp) for lp in event.logprobs)
        else:
            raise_if_error(event)
            return "".join(parts), event
    return "".join(parts), None


@dataclass
class _Sample:
    """One sample's answer, as `generate -n` prints it."""

    text: list[str] = field(default_factory=list)  # its chunks' text
    logprobs: list[tuple[str, TokenLogprob]] = field(default_factory=list)  # with chunk text
    finish: Finish | None = None


def _gather_samples(
    client: Client, prompt: Prompt, params: GenerationParams, tools: ToolFlags
) -> list[_Sample]:
    """Every sample of the request, gathered from its stream; raises the typed error of
    the first sample to end in ERROR."""
    samples = [_Sample() for _ in range(params.n)]
    for event in client.stream(prompt, params=params, tools=tools.tools, tool_choice=tools.choice):
        sample = samples[event.index]
        if isinstance(event, TokenChunk):
            sample.text.append(event.text)
            sample.logprobs.extend((event.text, lp) for lp in event.logprobs)
        else:
            raise_if_error(event)
            sample.finish = event
    return samples


def _print_samples(samples: list[_Sample]) -> None:
    """Each sample in index order: `[sample i]`, its text and its tool calls on stdout,
    then its logprobs and finish line (`sample i: [reason] ...`) on stderr."""
    for i, sample in enumerate(samples):
        print(f"[sample {i}]", flush=True)
        print("".join(sample.text), flush=True)
        print_calls(sample.finish.tool_calls if sample.finish else ())
        _print_logprobs(sample.logprobs)
        _print_finish(sample.finish, f"sample {i}: ")


def _chat_turn(
    client: Client, messages: list[ChatMessage], params: GenerationParams, tools: ToolFlags
) -> bool:
    """Answer the question that ends `messages`, appending the answer (and, while the
    model calls tools, each call's result as asked for and the next answer); False if
    the user stopped it (Ctrl-C, or Ctrl-D at a result prompt)."""
    while True:
        answer = _print_chat_answer(client, messages, params, tools)
        if answer is None:
            return False
        text, calls = answer
        messages.append(ChatMessage("assistant", text, tool_calls=calls))
        if not calls:
            return True
        results = _ask_results(calls)
        if results is None:
            return False
        messages.extend(results)


def _print_chat_answer(
    client: Client, messages: list[ChatMessage], params: GenerationParams, tools: ToolFlags
) -> tuple[str, tuple[ToolCall, ...]] | None:
    """Stream one answer, then print its calls; None if the user stopped it with Ctrl-C."""
    try:
        answer, finish = _print_answer(client, list(messages), params, tools)
    except KeyboardInterrupt:
        print("\n[stopped]", flush=True)
        return None
    print(flush=True)
    calls = finish.tool_calls if finish else ()
    print_calls(calls)
    return answer, calls


def _ask_results(calls: tuple[ToolCall, ...]) -> list[ChatMessage] | None:
    """A "tool" message per call with the result the user types; None if they stop."""
    try:
        return [
            ChatMessage("tool", input(f"[{call.name} {call.id}] result> "), tool_call_id=call.id)
            for call in calls
        ]
    except (KeyboardInterrupt, EOFError):
        print("\n[stopped]", flush=True)
        return None


def _print_logprobs(logprobs: list[tuple[str, TokenLogprob]]) -> None:
    """One line per generated token on stderr: id, its text (chunk's), logprob, top ones."""
    for text, lp in logprobs:
        top = "  ".join(f"{token}:{value:.4f}" for token, value in lp.top)
        line = f"{lp.token_id:>7} {text!r:<16} {lp.logprob:9.4f}"
        print(line + (f"  top {top}" if top else ""), file=sys.stderr)


def _result_json(result: Result) -> dict[str, Any]:
    """The --json document: sample 0's fields at the top, then every sample."""
    first = dataclasses.asdict(result.samples[0])
    del first["index"]
    return {
        "request_id": result.request_id,
        **first,
        "samples": [dataclasses.asdict(s) for s in result.samples],
    }


def _plain(value: Any) -> Any:
    """JSON for what dataclasses.asdict leaves: enums by their value."""
    if isinstance(value, enum.Enum):
        return value.value
    return str(value)


def _print_finish(finish: Finish | None, label: str = "") -> None:
    if finish is None:
        return
    u = finish.usage
    print(
        f"{label}[{finish.reason.value}] {u.generated_tokens} tokens, prompt {u.prompt_tokens}, "
        f"first token after {u.time_to_first_token_seconds:.2f} s, total {u.total_seconds:.2f} s"
        + (f"; {finish.error_message}" if finish.error_message else ""),
        file=sys.stderr,
    )
