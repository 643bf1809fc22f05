"""`treadle serve`: flags (each also read from an environment variable) and the entry point.

Importing this module is cheap (no torch); `run_serve` loads the server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ..scheduler.engine_config import EngineConfig


def _env(name: str, default: Any, kind: Callable[[str], Any] = str) -> Any:
    value = os.environ.get(name)
    return kind(value) if value not in (None, "") else default


def _boolean(text: str) -> bool:
    """An environment variable's truth: 1/true/yes/on or 0/false/no/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1 or 0)")


def positive_seconds(text: str) -> float:
    """A flag value that must be a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text!r})")
    return value


def _flag(
    p: argparse.ArgumentParser, flag: str, kind: Callable[[str], Any], default: Any, help: str
) -> None:
    """A flag whose default comes from TREADLE_<FLAG> when set; the help names the variable
    and the default in effect (the built-in one, or the variable's value)."""
    env = "TREADLE_" + flag.removeprefix("--").replace("-", "_").upper()
    value = _env(env, default, kind)
    shown = "" if value is None else f" (default: {value})"
    p.add_argument(flag, type=kind, default=value, help=f"{help}{shown} [{env}]")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the serve flags; defaults come from TREADLE_* environment variables."""
    defaults = EngineConfig()
    limits = defaults.limits
    for flag, kind, default, help in (
        (
            "--model",
            str,
            None,
            "model to serve: a transformers folder, a .gguf file or a hub id "
            "(default: the embedded SmolLM2-135M-Instruct)",
        ),
        ("--device", str, None, "cpu or cuda (default: cuda when available)"),
        ("--max-batch-rows", int, defaults.max_batch_rows, "requests running at once"),
        (
            "--max-seq-len",
            int,
            None,
            "positions one request may hold, prompt + new tokens (default: the model's context)",
        ),
        (
            "--kv-cache-memory",
            int,
            None,
            "bytes of KV cache pool (default: 1 GiB on CPU; on CUDA 85%% of the memory left "
            "free by the model)",
        ),
        (
            "--decode-lanes-memory",
            int,
            None,
            "bytes of decode lanes: a contiguous copy of each decoding request's KV, so a "
            "decode step reads it without gathering its blocks, in two tiers (lanes of L and "
            "2L positions); 0 = none (default: 576 MiB on CPU, 0 on CUDA)",
        ),
        ("--block-size", int, defaults.block_size, "positions per KV block"),
        (
            "--step-token-budget",
            int,
            None,
            "tokens fed per step: decodes first, then chunks of prompts "
            "(default: 112 on CPU, 2048 on CUDA)",
        ),
        (
            "--max-waiting",
            int,
            defaults.max_waiting,
            "queued requests beyond which new ones are refused",
        ),
        (
            "--priority-step",
            positive_seconds,
            defaults.priority_step,
            "seconds of waiting worth one request priority step: a waiting request "
            "overtakes one that arrived N x this later with N more priority (no starvation)",
        ),
        ("--host", str, "0.0.0.0", "address to listen on"),
        ("--port", int, 50051, "gRPC port; 0 picks a free one"),
        (
            "--http-port",
            int,
            8000,
            "port of the OpenAI-compatible HTTP API (/v1/chat/completions, ...); "
            "-1 = off, 0 picks a free one",
        ),
        (
            "--http-host",
            str,
            None,
            "address the HTTP API listens on (default: the --host value)",
        ),
        (
            "--metrics-host",
            str,
            None,
            "address the Prometheus /metrics endpoint listens on (default: the --host value)",
        ),
        ("--metrics-port", int, 9090, "Prometheus /metrics port; -1 = off, 0 picks a free one"),
        ("--grace-period", float, 30.0, "seconds running requests get to finish on SIGTERM"),
        ("--tls-cert", Path, None, "server certificate (PEM); with --tls-key serves TLS"),
        ("--tls-key", Path, None, "server private key (PEM)"),
        (
            "--tls-client-ca",
            Path,
            None,
            "CA certificate (PEM) that client certificates must chain to: mutual TLS",
        ),
        (
            "--auth-token-file",
            Path,
            None,
            "file holding the bearer token every call but health must carry; the token "
            "itself may be given in TREADLE_AUTH_TOKEN instead",
        ),
        (
            "--max-connection-age",
            float,
            300.0,
            "seconds after which a client connection is closed gracefully, so clients "
            "re-resolve and spread over new replicas; 0 = never",
        ),
        ("--max-request-bytes", int, 4 * 2**20, "largest request message accepted"),
        (
            "--max-concurrent-streams",
            int,
            256,
            "calls at once on one client connection (HTTP/2 streams; more wait in the "
            "client until one ends); 0 = no cap",
        ),
        (
            "--default-max-new-tokens",
            int,
            limits.default_max_new_tokens,
            "max_new_tokens of requests that leave it unset",
        ),
        ("--max-stop-strings", int, limits.max_stop_strings, "stop strings allowed per request"),
        ("--max-plugins", int, limits.max_plugins, "plugins allowed per request"),
        (
            "--max-top-logprobs",
            int,
            limits.max_top_logprobs,
            "logprob alternatives allowed per token",
        ),
        ("--max-samples", int, limits.max_samples, "samples (n) allowed per request"),
        ("--seed", int, None, "sampling seed for requests without their own"),
        ("--log-level", str, "INFO", "DEBUG, INFO, WARNING, ERROR"),
    ):
        _flag(p, flag, kind, default, help)
    prefix_cache = _env("TREADLE_PREFIX_CACHE", defaults.prefix_cache, _boolean)
    p.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=prefix_cache,
        help="reuse the KV of cached full blocks of earlier prompts "
        f"(default: {'on' if prefix_cache else 'off'}) [TREADLE_PREFIX_CACHE, 1 or 0]",
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[s for s in _env("TREADLE_PLUGINS", "").split(",") if s],
        metavar="[NAME=]MODULE:ATTR",
        help="register a logits-processor / stopping-criteria plugin (repeatable) "
        "[TREADLE_PLUGINS, comma-separated]",
    )


def serve_main(argv: list[str]) -> NoReturn:
    """`treadle serve ARGS...`: parse the flags (usage errors exit 2) and serve."""
    parser = argparse.ArgumentParser(
        prog="treadle serve",
        description="Serve a model over gRPC and OpenAI-compatible HTTP. Every flag can also "
        "be set by the environment variable named in its help.",
    )
    add_serve_arguments(parser)
    run_serve(parser.parse_args(argv))


def run_serve(args: argparse.Namespace) -> NoReturn:
    """Serve until SIGTERM/SIGINT, then end the process with the exit code.

    Exit codes: 0 after a drain, 1 when the server cannot start, 70 when the
    engine failed while serving (`serve_main.EXIT_*`).
    """
    try:
        logging.basicConfig(
            level=args.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    except ValueError as exc:
        print(f"treadle serve: --log-level: {exc}", file=sys.stderr)
        _end_process(1)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(
            f"treadle serve needs the server install: pip install 'treadle[server]' ({exc})",
            file=sys.stderr,
        )
        _end_process(1)
    from .serve_main import serve

    # Not asyncio.run: its teardown cancels the gRPC server's tasks, and a stopping gRPC
    # server answers CANCELLED to calls that arrive meanwhile. The loop is left as it is
    # after the drain, and the process ends: connections drop, clients see UNAVAILABLE.
    loop = asyncio.new_event_loop()
    _end_process(loop.run_until_complete(serve(args)))


def _end_process(code: int) -> NoReturn:
    """Flush the logs and streams, then end the process at once with `code`."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
