"""Microbenchmark: the logits processors' per-step cost as the history grows.

    python bench/history_cost.py [--rows 64] [--lengths 10 1000 8000] [--steps 20]

D rows with repetition, presence and frequency penalties and no_repeat_ngram_size 3
(SmolLM2's vocabulary, 49,152), each with a history of L tokens drawn from a
Zipf-like distribution (natural text has few distinct tokens). For each L it
runs `--steps` steps of the logits pipeline, appending one token to every row
between steps, in two ways:

- incremental: the rows keep their `TokenHistory` across steps (treadle's way);
- re-read: each step builds fresh histories from the token lists, so every
  statistic is computed from the whole history again (what a processor that
  re-reads the history pays).

Prints ms per step (median) and the mean distinct tokens per row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `treadle.worker` importable
    root = Path(__file__).resolve().parent.parent
    for part in ("worker", "api"):
        sys.path.insert(0, str(root / part))

from treadle.worker.history import TokenHistory
from treadle.worker.params import SamplingParams
from treadle.worker.plan import RowInput
from treadle.worker.processors import LogitsPipeline

VOCAB = 49152
PARAMS = SamplingParams(
    repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2, no_repeat_ngram_size=3
)


def tokens(rng: np.random.Generator, n: int) -> list[int]:
    """`n` ids from a Zipf-like law over the vocabulary (ranks shuffled by a fixed map)."""
    ranks = np.minimum(rng.zipf(1.2, size=n), VOCAB) - 1
    return ((ranks * 7919) % VOCAB).tolist()


def row(i: int, history: TokenHistory) -> RowInput:
    n = len(history)
    return RowInput(f"r{i}", 0, history.ids[-1:], n - 1, [0], history, PARAMS)


def run(rows: int, length: int, steps: int, incremental: bool) -> tuple[float, float]:
    rng = np.random.default_rng(length)
    pipeline = LogitsPipeline(VOCAB)
    histories = [TokenHistory(tokens(rng, length), prompt_len=length // 2) for _ in range(rows)]
    logits = torch.randn(rows, VOCAB)
    times: list[float] = []
    for _ in range(steps):
        if not incremental:
            histories = [TokenHistory(h.ids, h.prompt_len) for h in histories]
        batch = [row(i, h) for i, h in enumerate(histories)]
        started = time.perf_counter()
        pipeline(logits.clone(), batch)
        times.append(time.perf_counter() - started)
        for h, t in zip(histories, tokens(rng, rows), strict=True):
            h.append(t)
    distinct = statistics.mean(len(h.seen_ids()) for h in histories)
    return statistics.median(times) * 1e3, distinct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 1000, 8000])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"rows={args.rows} vocab={VOCAB} steps={args.steps}; ms per step (median)")
    print(f"{'history':>8} {'distinct':>9} {'incremental':>12} {'re-read':>9}")
    for length in args.lengths:
        warm, distinct = run(args.rows, length, args.steps, incremental=True)
        cold, _ = run(args.rows, length, max(3, args.steps // 4), incremental=False)
        print(f"{length:>8} {distinct:>9.0f} {warm:>12.2f} {cold:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
