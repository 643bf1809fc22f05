"""What every benchmark does first: load the model and workload, describe the run."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import torch

from bench.environment import environment
from bench.progress import Progress
from bench.workload import Workload, load_workload
from treadle.worker.loader import LoadedModel, load_model


class _Settings(Protocol):
    @property
    def requests(self) -> int | None: ...

    def as_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BenchStart:
    """The loaded parts of a benchmark run and the header of its report."""

    started: datetime
    progress: Progress
    loaded: LoadedModel
    workload: Workload
    context: dict[str, Any]  # keyword arguments of the report builder


def start_bench(
    args: argparse.Namespace, settings: _Settings, command: list[str], label: str
) -> BenchStart:
    """Set threads and logging, load the model (with progress) and the workload.

    `args` is the namespace of `bench.cli_args.common_parser`; `command` the
    command line recorded in the report.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per HTTP request
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = datetime.now(UTC)
    progress = Progress(interval_s=args.progress_interval, label=label)
    loaded = load_model(args.model, device=args.device)
    workload = load_workload(args.workload, loaded.tokenizer, settings.requests)
    progress.say(
        f"{loaded.name} on {loaded.device}; {len(workload.items)} requests, "
        f"{workload.useful_tokens:,} useful tokens"
    )
    context: dict[str, Any] = {
        "started": started,
        "command": [sys.executable, *command],
        "model": loaded.name,
        "workload": workload.summary(),
        "settings": {
            **settings.as_dict(),
            "device": str(loaded.device),
            "dtype": str(loaded.dtype),
        },
        "environment": environment(),
    }
    return BenchStart(started, progress, loaded, workload, context)
