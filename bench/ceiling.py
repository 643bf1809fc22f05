"""The ceiling: the bare model forward for one decode step, at a full batch.

    python -m bench.ceiling --context 85.12 [--model SPEC] [--batch 64] [--steps 30]

W1 measures it twice, before treadle's run and after all the others, and
compares treadle with their mean: the machines' speed drifts by more than
the figures compared. The first one runs in a process of its own (this
module's command line, printing its result as JSON): torch work on the
main thread before the engine starts would slow the engine's step thread
(an OpenMP team left on another thread, see worker/kv_arena.py `zeroed`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attention import standard_attention
from bench.run_result import BenchmarkError, RunResult

REPO = Path(__file__).resolve().parent.parent


def ceiling_prefill_len(context: float, warmup_steps: int, timed_steps: int) -> int:
    """Prompt length to prefill so the timed steps' mean KV length is about `context`.

    Decode step k (0-based, warmup included) attends over prefill + k + 1
    positions, so the timed steps average prefill + warmup + (timed + 1) / 2.
    """
    return max(1, round(context - warmup_steps - (timed_steps + 1) / 2))


@dataclass(frozen=True, slots=True)
class CeilingSteps:
    """What one ceiling times: `timed_steps` decode steps of `batch_size` rows, after
    `warmup_steps` untimed ones."""

    batch_size: int = 64
    timed_steps: int = 10
    warmup_steps: int = 2


def run_ceiling(
    model: Any,
    context: float,
    steps: CeilingSteps = CeilingSteps(),
    seed: int = 0,
    name: str = "ceiling",
) -> RunResult:
    """Time `steps.timed_steps` decode forwards at `steps.batch_size` rows around KV length
    `context`.

    The model's own DynamicCache and sdpa attention; no sampling (the next
    input is a fixed token), no mask (every row has the same length). Reports
    batch x steps / time as tokens/sec.
    """
    batch_size, timed_steps, warmup_steps = steps.batch_size, steps.timed_steps, steps.warmup_steps
    prefill = ceiling_prefill_len(context, warmup_steps, timed_steps)
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (batch_size, prefill), generator=generator)  # [B, P]
    step_ids = torch.full((batch_size, 1), 3, dtype=torch.long, device=model.device)  # [B, 1]
    with standard_attention(model), torch.inference_mode():
        # last position's logits only: the untimed prefill needs no [B, P, V] logits
        cache = model(prompt.to(model.device), use_cache=True, logits_to_keep=1).past_key_values
        for _ in range(warmup_steps):
            model(step_ids, past_key_values=cache, use_cache=True)
        _sync(model)
        started = time.perf_counter()
        for _ in range(timed_steps):
            model(step_ids, past_key_values=cache, use_cache=True)
        _sync(model)
        wall = time.perf_counter() - started
    mean_kv = prefill + warmup_steps + (timed_steps + 1) / 2
    return RunResult(
        name,
        0,
        batch_size * timed_steps,
        wall,
        {
            "batch_size": batch_size,
            "timed_steps": timed_steps,
            "warmup_steps": warmup_steps,
            "prefill_tokens": prefill,
            "mean_kv_len": mean_kv,
            "target_context": round(context, 2),
        },
    )


def _sync(model: Any) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def run_ceiling_process(
    model: str | None,
    context: float,
    steps: CeilingSteps = CeilingSteps(),
    threads: int | None = None,
    device: str | None = None,
    name: str = "ceiling",
    timeout_s: float = 600.0,
) -> RunResult:
    """`run_ceiling` in a process of its own, loading `model` (a `load_model` spec)."""
    command = [sys.executable, "-m", "bench.ceiling", "--context", str(context)]
    command += ["--batch", str(steps.batch_size), "--steps", str(steps.timed_steps)]
    command += ["--warmup", str(steps.warmup_steps), "--name", name]
    for flag, value in (("--model", model), ("--threads", threads), ("--device", device)):
        if value is not None:
            command += [flag, str(value)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise BenchmarkError(f"{name} process failed ({done.returncode}): {done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    keys = ("name", "requests", "useful_tokens", "wall_s", "tokens_per_s")
    details = {k: v for k, v in figures.items() if k not in keys}
    return RunResult(name, 0, figures["useful_tokens"], figures["wall_s"], details)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=float, required=True, help="mean KV length to time at")
    ap.add_argument("--model", default=None, help="load_model spec; None: the embedded SmolLM2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="ceiling")
    args = ap.parse_args(argv)
    from treadle.worker.loader import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    steps = CeilingSteps(args.batch, args.steps, args.warmup)
    result = run_ceiling(loaded.model, args.context, steps, name=args.name)
    print(json.dumps(result.as_dict()))


if __name__ == "__main__":
    main()
