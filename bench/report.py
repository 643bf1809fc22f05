"""The W1 report: every figure as JSON, a short markdown table, written to the results folder."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from .goals import check_goals
from .run_result import RunResult

SUBJECT = "treadle"
CEILINGS = ("ceiling_before", "ceiling")  # the bare forward, timed before and after the others


def ratios(results: dict[str, RunResult], subject: str = SUBJECT) -> dict[str, float]:
    """`subject`'s tokens/sec over each other run's, keyed "subject/other"."""
    if subject not in results:
        return {}
    mine = results[subject].tokens_per_s
    return {
        f"{subject}/{name}": mine / r.tokens_per_s
        for name, r in results.items()
        if name != subject and r.tokens_per_s > 0
    }


def build_report(
    results: dict[str, RunResult], *, started: datetime, **header: Any
) -> dict[str, Any]:
    """The whole JSON document of one W1 run (runs in the order they ran).

    `header`: command, model, workload, settings and environment (see `document`).
    """
    rates = ratios(results)
    ceilings = [r.tokens_per_s for name, r in results.items() if name in CEILINGS]
    if SUBJECT in results and ceilings and min(ceilings) > 0:
        rates["treadle/ceilings"] = results[SUBJECT].tokens_per_s / (sum(ceilings) / len(ceilings))
    figures = dict(rates)
    if SUBJECT in results:
        figures["scheduler_share"] = results[SUBJECT].details["scheduler_share"]
    return document("W1", results, rates, check_goals(figures), started, header)


def document(
    benchmark: str,
    results: dict[str, RunResult],
    rates: dict[str, float],
    goals: list[dict[str, Any]],
    started: datetime,
    header: dict[str, Any],
) -> dict[str, Any]:
    """A benchmark's JSON document: its name and date, `header` (the command,
    model, workload, settings, environment ...), then runs, ratios and goals."""
    return {
        "benchmark": benchmark,
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        **header,
        "runs": {name: r.as_dict() for name, r in results.items()},
        "ratios": {k: round(v, 4) for k, v in rates.items()},
        "goals": goals,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of `report`."""
    runs = report["runs"]
    lines = [
        *title_lines(report, "W1"),
        "| run | requests | useful tokens | wall s | tok/s | treadle / run |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in runs.items():
        ratio = report["ratios"].get(f"{SUBJECT}/{name}")
        lines.append(
            f"| {name} | {run['requests']} | {run['useful_tokens']:,} | {run['wall_s']:.1f} "
            f"| {run['tokens_per_s']:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    lines += ["", *_treadle_lines(runs.get(SUBJECT))]
    lines += _ceiling_lines({n: runs[n] for n in CEILINGS if n in runs}, report["ratios"])
    lines += ["", *goal_lines(report)]
    return "\n".join(lines) + "\n"


def title_lines(report: dict[str, Any], title: str) -> list[str]:
    """The markdown heading and the model / workload / machine line."""
    env, wl = report["environment"], report["workload"]
    return [
        f"# {title}, {report['date_utc']}",
        "",
        f"{report['model']}; {wl['requests']} requests, {wl['useful_tokens']:,} useful tokens; "
        f"{env['cpu_model']}, {env['torch_threads']} torch threads; "
        f"torch {env['torch']}, transformers {env['transformers']}",
        "",
    ]


def goal_lines(report: dict[str, Any]) -> list[str]:
    """The goals, each met, NOT met or not measured, with its figure."""
    lines = ["Goals:", ""]
    for g in report["goals"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        lines.append(
            f"- {g['goal']}: {mark}" + ("" if g["value"] is None else f" ({g['value']:.3f})")
        )
    return lines


def _treadle_lines(run: dict[str, Any] | None) -> list[str]:
    if run is None:
        return []
    return [
        f"treadle: {run['steps']:,} steps, mean decode batch {run['mean_decode_batch']}, "
        f"scheduler share {100 * run['scheduler_share']:.1f}% of step time; "
        f"TTFT p50/p99 {run['ttft_s'].get('p50')}/{run['ttft_s'].get('p99')} s, "
        f"e2e p50/p99 {run['e2e_s'].get('p50')}/{run['e2e_s'].get('p99')} s",
    ]


def _ceiling_lines(ceilings: dict[str, dict[str, Any]], rates: dict[str, float]) -> list[str]:
    if not ceilings:
        return []
    run = next(iter(ceilings.values()))
    lines = [
        "",
        f"ceiling: bare decode forward at batch {run['batch_size']}, KV length "
        f"{run['mean_kv_len']:.1f} on average over {run['timed_steps']} steps "
        f"(workload's token-weighted mean decode context {run['target_context']}), timed "
        + " and ".join(
            {"ceiling_before": "before treadle", "ceiling": "after"}[n] for n in ceilings
        ),
    ]
    if "treadle/ceilings" in rates:
        mean = sum(r["tokens_per_s"] for r in ceilings.values()) / len(ceilings)
        lines.append(
            f"treadle / ceiling (mean of {len(ceilings)}, {mean:.1f} tok/s): "
            f"{rates['treadle/ceilings']:.3f}x"
        )
    return lines


def write_report(report: dict[str, Any], out_dir: Path, started: datetime) -> list[Path]:
    """Write `w1-<UTC stamp>.json/.md` and overwrite `w1-latest.json/.md`; return the paths."""
    return write_documents("w1", report, render_markdown(report), out_dir, started)


def write_documents(
    prefix: str, report: dict[str, Any], markdown: str, out_dir: Path, started: datetime
) -> list[Path]:
    """Write `<prefix>-<UTC stamp>.json/.md` and overwrite `<prefix>-latest.json/.md`.

    Returns the paths written, stamped ones first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=1) + "\n"
    paths = []
    for stem in (f"{prefix}-{stamp}", f"{prefix}-latest"):
        for suffix, content in ((".json", text), (".md", markdown)):
            path = out_dir / f"{stem}{suffix}"
            path.write_text(content)
            paths.append(path)
    return paths
