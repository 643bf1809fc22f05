"""The W1 harness (bench/) on a tiny random llama: token accounting, runs, report files."""

from __future__ import annotations

import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `bench`

from bench_workload import BUDGETS
from helpers import make_tiny_model

from bench.ceiling import CeilingSteps, ceiling_prefill_len, run_ceiling_process
from bench.goals import check_goals
from bench.progress import Progress
from bench.report import build_report, render_markdown, write_report
from bench.run_result import BenchmarkError, RunResult
from bench.settings import W1Settings
from bench.treadle_run import Outcome, check_outcomes
from bench.w1 import parse_args, run_w1, settings_from
from bench.workload import Workload, mean_decode_context
from treadle.api.outcome import FinishReason, Usage
from treadle.scheduler.events import FinishEvent
from treadle.worker.attention import ATTENTION_NAME
from treadle.worker.loader import LoadedModel


def test_mean_decode_context_weights_each_generated_token() -> None:
    # a 10-token prompt generating 3 tokens sees 10, 11, 12; a 4-token one generating 1 sees 4
    assert mean_decode_context([10, 4], [3, 1]) == pytest.approx((10 + 11 + 12 + 4) / 4)
    # the ceiling's timed steps (after 2 warmup, 10 timed) average the target context
    prefill = ceiling_prefill_len(91.5, warmup_steps=2, timed_steps=10)
    assert prefill + 2 + (10 + 1) / 2 == pytest.approx(91.5, abs=0.5)


def test_workload_renders_chat_prompts_like_the_engine(workload: Workload, tokenizer: Any) -> None:
    assert workload.useful_tokens == sum(BUDGETS)
    text = tokenizer.apply_chat_template(
        workload.items[1].as_dicts(), add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert list(workload.prompts[1]) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert workload.head(2).budgets == BUDGETS[:2]


def test_a_short_request_fails_the_accounting(workload: Workload) -> None:
    def outcome(i: int, tokens: int) -> Outcome:
        usage = Usage(10, 0, tokens, 0.0, 0.1, 1.0)
        return Outcome(i, tokens, FinishEvent(f"t-{i}", FinishReason.LENGTH, usage))

    full = [outcome(i, b) for i, b in enumerate(BUDGETS)]
    assert check_outcomes(full, workload) == sum(BUDGETS)
    short = [*full[:-1], outcome(4, BUDGETS[4] - 1)]
    with pytest.raises(BenchmarkError, match="tokens of t-4"):
        check_outcomes(short, workload)


def test_goals_report_met_missed_and_unmeasured() -> None:
    goals = check_goals({"treadle/transformers_cb": 3.2, "scheduler_share": 0.12})
    assert [g["met"] for g in goals] == [True, None, False]


def test_the_engine_flags_reach_the_engine_config() -> None:
    defaults = settings_from(parse_args([])).engine_config()
    assert (defaults.max_batch_rows, defaults.max_seq_len) == (64, 256)
    assert defaults.step_token_budget == 512  # 64 decodes leave 448 for W1's 35-55 token prompts
    assert defaults.kv_cache_memory is None and defaults.prefix_cache  # the engine's defaults
    argv = ["--max-batch-rows", "8", "--max-seq-len", "96", "--step-token-budget", "32"]
    argv += ["--kv-cache-memory", str(2**20), "--no-prefix-cache"]
    config = settings_from(parse_args(argv)).engine_config()
    assert (config.max_batch_rows, config.max_seq_len, config.step_token_budget) == (8, 96, 32)
    assert (config.kv_cache_memory, config.prefix_cache) == (2**20, False)


def test_w1_runs_every_peer_and_writes_the_report(
    tiny: LoadedModel, workload: Workload, tmp_path: Path
) -> None:
    settings = W1Settings(
        clients=3,
        max_batch_rows=4,
        max_seq_len=128,
        step_token_budget=64,
        kv_cache_memory=2**20,  # 2,048 positions of the tiny model (512 bytes each)
        single_requests=2,
        static_batch=2,
        cb_num_blocks=16,  # transformers sizes its cache from free memory otherwise (slow)
        cb_max_batch_tokens=256,
        ceiling_batch=4,
        ceiling_steps=2,
        ceiling_warmup=1,
        skip=frozenset({"ceiling_before"}),  # a process of its own: its own test below
    )
    log = io.StringIO()
    seen: list[list[str]] = []
    results = run_w1(
        tiny, workload, settings, Progress(log), on_result=lambda r: seen.append(list(r))
    )

    names = ["treadle", "generate_single", "generate_static2", "transformers_cb", "ceiling"]
    assert list(results) == names
    assert seen == [names[: i + 1] for i in range(len(names))]
    assert results["treadle"].useful_tokens == sum(BUDGETS)
    assert results["transformers_cb"].useful_tokens == sum(BUDGETS)
    assert results["transformers_cb"].details["max_batch_tokens"] == 256  # the setting got there
    assert results["generate_single"].useful_tokens == sum(BUDGETS[:2])
    static = results["generate_static2"]
    assert static.useful_tokens == sum(BUDGETS)
    assert static.details["computed_tokens"] == 2 * 7 + 2 * 5 + 1 * 4  # each batch to its longest
    assert results["ceiling"].useful_tokens == 4 * 2
    treadle = results["treadle"].details
    assert treadle["steps"] > 0
    assert 0 < treadle["mean_decode_batch"] <= settings.clients
    assert 0 <= treadle["scheduler_share"] < 1
    assert tiny.model.config._attn_implementation == ATTENTION_NAME  # peers switched back
    assert "treadle: start" in log.getvalue()

    started = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    report = build_report(
        results,
        started=started,
        command=["bench/w1.py"],
        model=tiny.name,
        workload=workload.summary(),
        settings=settings.as_dict(),
        environment={"cpu_model": "test", "torch_threads": 1, "torch": "x", "transformers": "y"},
    )
    paths = write_report(report, tmp_path / "results", started)
    assert sorted(p.name for p in paths) == [
        "w1-20300102T030405Z.json",
        "w1-20300102T030405Z.md",
        "w1-latest.json",
        "w1-latest.md",
    ]
    saved = json.loads((tmp_path / "results" / "w1-latest.json").read_text())
    assert saved == json.loads((tmp_path / "results" / "w1-20300102T030405Z.json").read_text())
    assert saved["workload"]["useful_tokens"] == sum(BUDGETS)
    runs = saved["runs"]
    assert runs["treadle"]["tokens_per_s"] == pytest.approx(
        sum(BUDGETS) / results["treadle"].wall_s, rel=1e-3
    )
    want = results["treadle"].tokens_per_s / results["transformers_cb"].tokens_per_s
    assert saved["ratios"]["treadle/transformers_cb"] == pytest.approx(want, rel=1e-3)
    assert set(saved["ratios"]) == {f"treadle/{n}" for n in [*names[1:], "ceilings"]}
    assert saved["ratios"]["treadle/ceilings"] == saved["ratios"]["treadle/ceiling"]  # one
    assert all(g["met"] is not None for g in saved["goals"])
    assert "| generate_static2 | 5 |" in render_markdown(saved)


def test_the_ceiling_before_runs_in_its_own_process_and_both_ceilings_make_the_ratio(
    tmp_path: Path, tokenizer: Any
) -> None:
    model_dir = tmp_path / "tiny"
    make_tiny_model(tokenizer).model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    before = run_ceiling_process(
        str(model_dir), 20.0, CeilingSteps(4, 3, 1), threads=1, name="ceiling_before",
        timeout_s=300,
    )  # fmt: skip
    assert before.name == "ceiling_before" and before.useful_tokens == 4 * 3
    assert before.wall_s > 0 and before.details["mean_kv_len"] == pytest.approx(20.0, abs=0.5)
    with pytest.raises(BenchmarkError, match="ceiling_before process failed"):
        run_ceiling_process(str(tmp_path / "missing"), 20.0, name="ceiling_before")
    details = {"steps": 9, "mean_decode_batch": 3.0, "scheduler_share": 0.01}
    details |= {"ttft_s": {"p50": 0.1}, "e2e_s": {"p50": 1.0}}
    treadle = RunResult("treadle", 5, 900, 3.0, details)  # 300 tok/s
    after = RunResult("ceiling", 0, 800, 2.0, dict(before.details))  # 400 tok/s
    first = RunResult("ceiling_before", 0, 1000, 2.0, dict(before.details))  # 500 tok/s
    results = {"ceiling_before": first, "treadle": treadle, "ceiling": after}
    report = build_report(
        results,
        started=datetime(2030, 1, 2, tzinfo=UTC),
        command=["bench/w1.py"],
        model="tiny",
        workload={"requests": 5, "useful_tokens": 900},
        settings={},
        environment={"cpu_model": "test", "torch_threads": 1, "torch": "x", "transformers": "y"},
    )
    assert report["ratios"]["treadle/ceilings"] == pytest.approx(300 / 450, abs=1e-4)
    (goal,) = [g for g in report["goals"] if g["figure"] == "treadle/ceilings"]
    assert goal["met"] is False and goal["target"] == 0.80
    assert "treadle / ceiling (mean of 2, 450.0 tok/s): 0.667x" in render_markdown(report)
