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
from typing import Any


def _env(name: str, default: Any, kind: Callable[[str], Any] = str) -> Any:
    value = os.environ.get(name)
    return kind(value) if value not in (None, "") else default


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the serve flags; defaults come from TREADLE_* environment variables."""
    p.add_argument(
        "--model",
        default=_env("TREADLE_MODEL", None),
        help="model to serve: a transformers folder, a .gguf file or a hub id "
        "(default: the embedded SmolLM2-135M-Instruct) [TREADLE_MODEL]",
    )
    p.add_argument(
        "--device",
        default=_env("TREADLE_DEVICE", None),
        help="cpu or cuda (default: cuda when available) [TREADLE_DEVICE]",
    )
    p.add_argument(
        "--max-batch-rows",
        type=int,
        default=_env("TREADLE_MAX_BATCH_ROWS", 64, int),
        help="sequences running at once (KV rows) [TREADLE_MAX_BATCH_ROWS]",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=_env("TREADLE_MAX_SEQ_LEN", None, int),
        help="KV positions per row, i.e. prompt + new tokens of one request "
        "(default: min(model context, 2048)) [TREADLE_MAX_SEQ_LEN]",
    )
    p.add_argument(
        "--prefill-token-budget",
        type=int,
        default=_env("TREADLE_PREFILL_TOKEN_BUDGET", 512, int),
        help="prompt tokens admitted per step [TREADLE_PREFILL_TOKEN_BUDGET]",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=_env("TREADLE_MAX_WAITING", 1024, int),
        help="queued requests beyond which new ones are refused [TREADLE_MAX_WAITING]",
    )
    p.add_argument(
        "--prefix-cache-rows",
        type=int,
        default=_env("TREADLE_PREFIX_CACHE_ROWS", 4, int),
        help="spare KV rows caching recent prompts for prefix reuse; 0 = off "
        "[TREADLE_PREFIX_CACHE_ROWS]",
    )
    p.add_argument(
        "--host",
        default=_env("TREADLE_HOST", "0.0.0.0"),
        help="address to listen on [TREADLE_HOST]",
    )
    p.add_argument(
        "--port",
        type=int,
        default=_env("TREADLE_PORT", 50051, int),
        help="gRPC port; 0 picks a free one [TREADLE_PORT]",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env("TREADLE_METRICS_PORT", 9090, int),
        help="Prometheus /metrics port; -1 = off, 0 picks a free one [TREADLE_METRICS_PORT]",
    )
    p.add_argument(
        "--grace-period",
        type=float,
        default=_env("TREADLE_GRACE_PERIOD", 30.0, float),
        help="seconds running requests get to finish on SIGTERM [TREADLE_GRACE_PERIOD]",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=_env("TREADLE_TLS_CERT", None, Path),
        help="server certificate (PEM); with --tls-key serves TLS [TREADLE_TLS_CERT]",
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        default=_env("TREADLE_TLS_KEY", None, Path),
        help="server private key (PEM) [TREADLE_TLS_KEY]",
    )
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        default=_env("TREADLE_TLS_CLIENT_CA", None, Path),
        help="CA certificate (PEM) that client certificates must chain to: mutual TLS "
        "[TREADLE_TLS_CLIENT_CA]",
    )
    p.add_argument(
        "--auth-token-file",
        type=Path,
        default=_env("TREADLE_AUTH_TOKEN_FILE", None, Path),
        help="file holding the bearer token every call but health must carry; the token "
        "itself may be given in TREADLE_AUTH_TOKEN instead [TREADLE_AUTH_TOKEN_FILE]",
    )
    p.add_argument(
        "--max-connection-age",
        type=float,
        default=_env("TREADLE_MAX_CONNECTION_AGE", 300.0, float),
        help="seconds after which a client connection is closed gracefully, so clients "
        "re-resolve and spread over new replicas; 0 = never [TREADLE_MAX_CONNECTION_AGE]",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=_env("TREADLE_MAX_REQUEST_BYTES", 4 * 2**20, int),
        help="largest request message accepted [TREADLE_MAX_REQUEST_BYTES]",
    )
    p.add_argument(
        "--default-max-new-tokens",
        type=int,
        default=_env("TREADLE_DEFAULT_MAX_NEW_TOKENS", 256, int),
        help="max_new_tokens of requests that leave it unset [TREADLE_DEFAULT_MAX_NEW_TOKENS]",
    )
    p.add_argument(
        "--max-stop-strings",
        type=int,
        default=_env("TREADLE_MAX_STOP_STRINGS", 16, int),
        help="stop strings allowed per request [TREADLE_MAX_STOP_STRINGS]",
    )
    p.add_argument(
        "--max-plugins",
        type=int,
        default=_env("TREADLE_MAX_PLUGINS", 8, int),
        help="plugins allowed per request [TREADLE_MAX_PLUGINS]",
    )
    p.add_argument(
        "--max-top-logprobs",
        type=int,
        default=_env("TREADLE_MAX_TOP_LOGPROBS", 20, int),
        help="logprob alternatives allowed per token [TREADLE_MAX_TOP_LOGPROBS]",
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[s for s in _env("TREADLE_PLUGINS", "").split(",") if s],
        metavar="[NAME=]MODULE:ATTR",
        help="register a logits-processor / stopping-criteria plugin (repeatable) "
        "[TREADLE_PLUGINS, comma-separated]",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_env("TREADLE_SEED", None, int),
        help="sampling seed for requests without their own [TREADLE_SEED]",
    )
    p.add_argument(
        "--log-level",
        default=_env("TREADLE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ERROR [TREADLE_LOG_LEVEL]",
    )


def serve_main(argv: list[str]) -> int:
    """`treadle serve ARGS...`: parse the flags and serve."""
    parser = argparse.ArgumentParser(
        prog="treadle serve",
        description="Serve a model over gRPC. Every flag can also be set by the environment "
        "variable named in its help.",
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(
            f"treadle serve needs the server install: pip install 'treadle[server]' ({exc})",
            file=sys.stderr,
        )
        return 2
    from .serve_main import serve

    return asyncio.run(serve(args))
