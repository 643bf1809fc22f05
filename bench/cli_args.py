"""Command-line flags every benchmark script shares."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Protocol

from bench.workload import default_workload_path


class EngineDefaults(Protocol):
    @property
    def clients(self) -> int: ...
    @property
    def max_batch_rows(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...
    @property
    def step_token_budget(self) -> int: ...
    @property
    def kv_cache_memory(self) -> int | None: ...
    @property
    def prefix_cache(self) -> bool: ...


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def common_parser(
    description: str | None, repo: Path, d: EngineDefaults
) -> argparse.ArgumentParser:
    """A parser with the flags of every benchmark: workload, model, output, engine settings."""
    ap = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    ap.add_argument("--requests", type=int, default=None, help="first N requests; None: all")
    ap.add_argument("--out", type=Path, default=repo / "bench" / "results", help="results folder")
    ap.add_argument("--model", default=None, help="load_model spec; None: the embedded SmolLM2")
    ap.add_argument("--device", default=None, help="None: cuda if available, else cpu")
    ap.add_argument(
        "--workload", type=Path, default=default_workload_path(repo), help="the W1 requests"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (and OMP_NUM_THREADS of a server process); None: torch's own",
    )
    ap.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed warmup call before each run"
    )
    ap.add_argument(
        "--progress-interval", type=float, default=10.0, help="seconds between token counts"
    )
    ap.add_argument("--clients", type=int, default=d.clients, help="W1's closed-loop clients")
    ap.add_argument(
        "--max-batch-rows", type=int, default=d.max_batch_rows, help="engine: requests at once"
    )
    ap.add_argument(
        "--max-seq-len", type=int, default=d.max_seq_len, help="engine: positions per request"
    )
    ap.add_argument(
        "--step-token-budget",
        type=int,
        default=d.step_token_budget,
        help="engine: tokens fed per step, decodes first, then prompt chunks",
    )
    ap.add_argument(
        "--kv-cache-memory",
        type=int,
        default=d.kv_cache_memory,
        help="engine: bytes of KV pool; None: the engine's default (1 GiB on CPU)",
    )
    ap.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=d.prefix_cache,
        help="engine: reuse cached KV blocks of earlier prompts",
    )
    return ap
