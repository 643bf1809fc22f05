"""A small W1-shaped workload for the benchmark harness tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `bench`

from bench.workload import Workload, load_workload

BUDGETS = [3, 7, 2, 5, 4]


def write_workload(tmp_path: Path, budgets: list[int]) -> Path:
    requests = [
        {
            "id": f"t-{i}",
            "messages": [{"role": "user", "content": "word " * (3 + 4 * i) + "?"}],
            "max_new_tokens": budget,
        }
        for i, budget in enumerate(budgets)
    ]
    path = tmp_path / "w1.json"
    path.write_text(json.dumps({"requests": requests}))
    return path


def small_workload(tmp_path: Path, tokenizer: Any) -> Workload:
    """The BUDGETS workload, loaded."""
    return load_workload(write_workload(tmp_path, BUDGETS), tokenizer)
