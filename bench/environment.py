"""Where a benchmark ran: machine, library versions, threads."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(
    cpuinfo: Path = Path("/proc/cpuinfo"), wanted: tuple[str, ...] = ("avx2", "avx512f")
) -> dict[str, bool]:
    """Which of the `wanted` instruction-set flags the CPU reports."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return {flag: flag in flags for flag in wanted}


def environment() -> dict[str, Any]:
    """Everything about the machine and software that a figure depends on."""
    import transformers

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
