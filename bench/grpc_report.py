"""The gRPC report: W1 through the server against in-process, W2 latencies; JSON and markdown."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from .goals import GRPC_GOALS, check_goals
from .report import document, goal_lines, title_lines, write_documents
from .run_result import RunResult

RATIO = ("w1_grpc", "w1_inprocess")  # the frontend's cost: numerator over denominator
W2_RUNS = (("w2_grpc", "gRPC"), ("w2_inprocess", "in-process"))


def frontend_ratio(results: dict[str, RunResult]) -> dict[str, float]:
    """{"w1_grpc/w1_inprocess": tokens/s over tokens/s} once both ran; else {}."""
    num, den = (results.get(name) for name in RATIO)
    if num is None or den is None or den.tokens_per_s <= 0:
        return {}
    return {"/".join(RATIO): num.tokens_per_s / den.tokens_per_s}


def build_grpc_report(
    results: dict[str, RunResult], *, started: datetime, **header: Any
) -> dict[str, Any]:
    """The whole JSON document of one gRPC run (runs in the order they ran).

    `header`: command, model, workload, settings, server and environment.
    """
    rates = frontend_ratio(results)
    goals = check_goals(rates, GRPC_GOALS)
    return document("W1+W2 over gRPC", results, rates, goals, started, header)


def render_grpc_markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of `report`."""
    runs = report["runs"]
    lines = [
        *title_lines(report, "W1 and W2 over gRPC"),
        "| run | requests | useful tokens | wall s | tok/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['requests']} | {run['useful_tokens']:,} | {run['wall_s']:.1f} "
            f"| {run['tokens_per_s']:.1f} |"
        )
    lines += ["", *_w1_lines(report), *_w2_lines(runs), *goal_lines(report)]
    return "\n".join(lines) + "\n"


def _w1_lines(report: dict[str, Any]) -> list[str]:
    runs, ratio = report["runs"], report["ratios"].get("/".join(RATIO))
    lines = []
    if ratio is not None:
        lines.append(f"W1: gRPC / in-process = {ratio:.3f}x tokens/s (the frontend's cost)")
    if "w1_grpc" in runs:
        w1 = runs["w1_grpc"]
        capacity = w1["requests"] / w1["wall_s"]
        lines.append(
            f"W1 capacity over gRPC: {capacity:.3f} requests/s; client-side TTFT p50/p99 "
            f"{_ms(w1['ttft_s'].get('p50'))}/{_ms(w1['ttft_s'].get('p99'))} ms"
        )
        if "w2_grpc" in runs:
            load = runs["w2_grpc"]["target_rate_rps"] / capacity
            lines.append(f"W2 arrival rate: {load:.2f} x that capacity")
    return [*lines, ""] if lines else []


def _w2_lines(runs: dict[str, Any]) -> list[str]:
    measured = [(label, runs[name]) for name, label in W2_RUNS if name in runs]
    if not measured:
        return []
    first = measured[0][1]
    lines = [
        f"W2: Poisson arrivals (seed {first['seed']}) at {first['target_rate_rps']:.3f} "
        f"requests/s (this schedule: {first['scheduled_rate_rps']:.3f}); client-side "
        "latencies in ms (ITL: every gap between token events)",
        "",
        "| path | achieved arrivals/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 "
        "| e2e p50 | e2e p99 | tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, run in measured:
        cells = [_ms(run[f].get(p)) for f in ("ttft_s", "itl_s", "e2e_s") for p in ("p50", "p99")]
        lines.append(
            f"| {label} | {run['achieved_rate_rps']:.3f} | {' | '.join(cells)} "
            f"| {run['tokens_per_s']:.1f} |"
        )
    return [*lines, ""]


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1000 * seconds:.1f}"


def write_grpc_report(report: dict[str, Any], out_dir: Path, started: datetime) -> list[Path]:
    """Write `grpc-<UTC stamp>.json/.md` and overwrite `grpc-latest.json/.md`; return the paths."""
    return write_documents("grpc", report, render_grpc_markdown(report), out_dir, started)
