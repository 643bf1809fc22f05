"""The VLM benchmark (bench/vlm.py) end to end on a tiny random DeepSeek-VL with 32-pixel
pictures: every run, its token counts, the image-arrivals figures and the report files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `bench`

from bench.vlm import main


def test_vlm_runs_every_run_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--requests", "4", "--new-tokens", "4", "--image-size", "32", "--static-batch", "2"]
    argv += ["--streams", "2", "--stream-tokens", "24", "--image-arrivals", "2"]
    argv += ["--warm-tokens", "4", "--out", str(tmp_path)]
    assert main(argv) == 0

    stamped = sorted(p.name for p in tmp_path.glob("vlm-2*"))
    assert [Path(n).suffix for n in stamped] == [".json", ".md"]
    report = json.loads((tmp_path / "vlm-latest.json").read_text())
    assert report["benchmark"] == "VLM"
    workload = report["workload"]
    assert (workload["requests"], workload["useful_tokens"]) == (4, 16)
    assert workload["image_tokens"] == 16  # (32 / 8) ** 2 patches
    assert workload["prompt_tokens"] > 4 * 16
    runs = report["runs"]
    assert list(runs) == ["treadle", "generate_single", "generate_static2"]
    for run in runs.values():
        assert (run["requests"], run["useful_tokens"]) == (4, 16)
        assert run["wall_s"] > 0 and run["tokens_per_s"] > 0
    assert runs["treadle"]["prompt_tokens"] == workload["prompt_tokens"]
    assert runs["treadle"]["prefill_steps"] >= 1
    assert set(report["ratios"]) == {"treadle/generate_single", "treadle/generate_static2"}
    gap = report["image_arrivals"]
    assert set(gap["text_gap_before_s"]) == {"p50", "p99", "max"}
    assert set(gap["text_gap_during_s"]) == {"p50", "p99", "max"}
    assert gap["image_ttft_s"]["max"] >= gap["image_ttft_s"]["p50"] > 0
    assert 0 <= gap["streams_through_window"] <= 2
    out = capsys.readouterr().out
    assert "| generate_static2 | 4 | 16 |" in out
    assert "## Image prefill and running text streams" in out
    assert out == (tmp_path / "vlm-latest.md").read_text() + "\n"  # the summary, as written
