"""The frontend report: W1 over gRPC and HTTP against in-process, W2 latencies; JSON, markdown."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from .goals import GRPC_GOALS, check_goals
from .report import document, goal_lines, title_lines, write_documents
from .run_result import RunResult

REFERENCE = "w1_inprocess"  # what each frontend's W1 is measured against
W1_FRONTENDS = (("w1_grpc", "gRPC"), ("w1_http", "HTTP"))  # run, label
W2_RUNS = (("w2_grpc", "gRPC"), ("w2_inprocess", "in-process"))
LATENCIES = ("ttft_s", "itl_s", "e2e_s")  # client-side, p50 and p99 of each in the tables


def ratio_key(run: str) -> str:
    """The key of `run`'s tokens/s over the reference's: "w1_http/w1_inprocess"."""
    return f"{run}/{REFERENCE}"


def frontend_ratios(results: dict[str, RunResult]) -> dict[str, float]:
    """Each frontend's W1 tokens/s over in-process (the frontend's cost), for those that ran."""
    ref = results.get(REFERENCE)
    if ref is None or ref.tokens_per_s <= 0:
        return {}
    return {
        ratio_key(name): results[name].tokens_per_s / ref.tokens_per_s
        for name, _ in W1_FRONTENDS
        if name in results
    }


def build_grpc_report(
    results: dict[str, RunResult], *, started: datetime, **header: Any
) -> dict[str, Any]:
    """The whole JSON document of one gRPC run (runs in the order they ran).

    `header`: command, model, workload, settings, server (and http_server) and environment.
    """
    rates = frontend_ratios(results)
    goals = check_goals(rates, GRPC_GOALS)
    return document("W1+W2 over gRPC", results, rates, goals, started, header)


def render_grpc_markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of `report`."""
    runs = report["runs"]
    lines = [
        *title_lines(report, "W1 and W2 over gRPC and HTTP"),
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
    runs, ratios = report["runs"], report["ratios"]
    measured = [(label, name, runs[name]) for name, label in W1_FRONTENDS if name in runs]
    if not measured:
        return []
    lines = [
        "W1 through each frontend: tokens/s over in-process (the frontend's cost) and "
        "client-side latencies in ms (ITL: every gap between token events)",
        "",
        f"| path | tok/s | / in-process | {_latency_heads()} |",
        "| --- | ---: | ---: |" + " ---: |" * 2 * len(LATENCIES),
    ]
    for label, name, run in measured:
        ratio = ratios.get(ratio_key(name))
        lines.append(
            f"| {label} | {run['tokens_per_s']:.1f} | {'' if ratio is None else f'{ratio:.3f}x'} "
            f"| {_latency_cells(run)} |"
        )
    lines.append("")
    if "w1_grpc" in runs:
        w1 = runs["w1_grpc"]
        capacity = w1["requests"] / w1["wall_s"]
        line = f"W1 capacity over gRPC: {capacity:.3f} requests/s"
        if "w2_grpc" in runs:
            load = runs["w2_grpc"]["target_rate_rps"] / capacity
            line += f"; W2 arrival rate: {load:.2f} x that capacity"
        lines += [line, ""]
    return lines


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
        f"| path | achieved arrivals/s | {_latency_heads()} | tok/s |",
        "| --- | ---: |" + " ---: |" * 2 * len(LATENCIES) + " ---: |",
    ]
    for label, run in measured:
        lines.append(
            f"| {label} | {run['achieved_rate_rps']:.3f} | {_latency_cells(run)} "
            f"| {run['tokens_per_s']:.1f} |"
        )
    return [*lines, ""]


def _latency_heads() -> str:
    names = {"ttft_s": "TTFT", "itl_s": "ITL", "e2e_s": "e2e"}
    return " | ".join(f"{names[f]} {p}" for f in LATENCIES for p in ("p50", "p99"))


def _latency_cells(run: dict[str, Any]) -> str:
    return " | ".join(_ms(run[f].get(p)) for f in LATENCIES for p in ("p50", "p99"))


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1000 * seconds:.1f}"


def write_grpc_report(report: dict[str, Any], out_dir: Path, started: datetime) -> list[Path]:
    """Write `grpc-<UTC stamp>.json/.md` and overwrite `grpc-latest.json/.md`; return the paths."""
    return write_documents("grpc", report, render_grpc_markdown(report), out_dir, started)
