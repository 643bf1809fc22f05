"""`treadle serve`: flags (each also read from an environment variable) and the entry point.

Importing this module is cheap (no torch); `run_serve` loads the server.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
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


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and run the engine; returns the process exit code."""
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
    from .demo import run_demo

    return run_demo(args)
