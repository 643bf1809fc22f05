"""What the scenario benchmarks (W3, W4) share: their start, their report and its files."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.environment import environment
from bench.progress import Progress
from treadle.worker.loader import LoadedModel, load_model


def scenario_parser(description: str, out: Path) -> argparse.ArgumentParser:
    """The flags every scenario takes: the model, its device, where results go."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=None, help="load_model spec; default: embedded SmolLM2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=out)
    return ap


@dataclass(frozen=True)
class Scenario:
    """A started scenario run: its name, arguments, clock, progress and model."""

    name: str  # "w3", "w4": the report's files are <out>/<name>-<stamp>.*
    args: argparse.Namespace
    started: datetime
    progress: Progress
    loaded: LoadedModel

    @classmethod
    def start(cls, name: str, args: argparse.Namespace) -> Scenario:
        """Logging on stderr, then the model (with progress)."""
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
        started = datetime.now(UTC)
        progress = Progress(label=name)
        return cls(name, args, started, progress, load_model(args.model, device=args.device))

    def report(self, runs: list[dict[str, Any]], goals: dict[str, Any]) -> dict[str, Any]:
        """The JSON document of the run."""
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()}
        return {
            "benchmark": self.name,
            "started": self.started.isoformat(),
            "command": [sys.executable, *sys.argv],
            "model": self.loaded.name,
            "environment": environment(),
            "settings": settings,
            "runs": runs,
            "goals": goals,
        }

    def write(self, report: dict[str, Any], text: str) -> None:
        """Print the markdown; write both under `--out` (stamped, and as -latest)."""
        print(text)
        out: Path = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        for name in (f"{self.name}-{stamp}", f"{self.name}-latest"):
            (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
            (out / f"{name}.md").write_text(text + "\n")
