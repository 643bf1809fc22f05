"""Microbenchmark: a W1-like step with and without decode lanes, interleaved.

    python bench/decode_lanes.py [--rows 50] [--lanes-memory-mib 0 576] [--rounds 7]

One SmolLM2 worker per setting (`--decode-lanes-memory` of N MiB, in the
worker's tiers: with 64 batch rows, 576 MiB gives 64 lanes of 96 positions
and 32 of 192; 0 = none, every decode row gathered from the pool). Every step feeds
`--rows` decoding rows whose contexts spread over W1's range (36..183
positions, each growing by one a step and starting over as a new request
past the end) and one prompt chunk of 18 tokens after a 24-token cached
prefix (a W1 prompt after its prefix-cache hit). Rows keep their history
objects across steps, as requests do, so lanes persist. The settings run in
turn, `--steps` steps each, for `--rounds` rounds; prints ms per step per
round, the medians and each setting's paired ratio to the first, and the
median time per step inside the attention function (`AttentionClock`: writes,
gathers and attention of every layer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the treadle packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treadle.worker import attention
from treadle.worker.history import TokenHistory
from treadle.worker.loader import LoadedModel, load_model
from treadle.worker.params import SamplingParams
from treadle.worker.plan import RowInput, StepPlan
from treadle.worker.worker import Worker, WorkerConfig

GREEDY = SamplingParams()
SHORTEST, LONGEST = 36, 183  # W1's decode contexts: 35-55 prompt tokens + up to 128 new
BATCH_ROWS = 64


class Feed:
    """The decode rows and the prompt chunk of one worker's steps."""

    def __init__(self, rows: int, block_size: int) -> None:
        self.rows = rows
        self.block_size = block_size
        span = LONGEST - SHORTEST
        self.offsets = [(i * 53) % span for i in range(rows)]  # spread over the range
        self.histories: dict[int, TokenHistory] = {}
        self.step = 0

    def plan(self) -> StepPlan:
        bs, span = self.block_size, LONGEST - SHORTEST
        per_row = -(-LONGEST // bs)  # blocks each row's table may reach
        decode = []
        for i in range(self.rows):
            n = SHORTEST + (self.offsets[i] + self.step) % span  # context before this token
            h = self.histories.get(i)
            if h is None or len(h.ids) > n + 1:  # a new request takes the row
                h = self.histories[i] = TokenHistory([3 + (i * 7 + j) % 1000 for j in range(n)])
            while len(h.ids) < n + 1:
                h.append(5)
            table = list(range(i * per_row, (i + 1) * per_row))
            decode.append(RowInput(f"r{i}", 0, h.ids[n:], n, table, h, GREEDY))
        prompt = TokenHistory([7 + j for j in range(42)])
        first = self.rows * per_row
        chunk = RowInput("p", 0, prompt.ids[24:], 24, list(range(first, first + 3)), prompt, GREEDY)
        self.step += 1
        return StepPlan(step=self.step, decode=decode, prefill=[chunk])


def worker_for(loaded: LoadedModel, mib: int) -> Worker:
    config = WorkerConfig(
        max_batch_rows=BATCH_ROWS, max_seq_len=256, decode_lanes_memory=mib * 2**20
    )
    return Worker(loaded, config)


def tiers_of(worker: Worker) -> str:
    lanes = worker.runner.lanes
    if lanes is None:
        return "no lanes"
    return " + ".join(f"{t.lanes} x {t.lane_len}" for t in lanes.tiers)


class AttentionClock:
    """Seconds spent inside treadle's attention function, registered in its place."""

    def __init__(self) -> None:
        from transformers import AttentionInterface

        self.seconds = 0.0
        AttentionInterface.register(attention.ATTENTION_NAME, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return attention.paged_attention(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def timed(worker: Worker, feed: Feed, steps: int, clock: AttentionClock) -> tuple[float, float]:
    """Seconds per step, and of them inside the attention function."""
    clock.seconds = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        worker.execute(feed.plan())
    return (time.perf_counter() - started) / steps, clock.seconds / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50, help="decoding rows (W1's mean batch: 50)")
    ap.add_argument("--lanes-memory-mib", type=int, nargs="+", default=[0, 576])
    ap.add_argument("--steps", type=int, default=8, help="steps per setting per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    loaded = load_model(None)
    settings = {m: (worker_for(loaded, m), Feed(args.rows, 16)) for m in args.lanes_memory_mib}
    clock = AttentionClock()  # after the workers: they register the attention function
    for worker, feed in settings.values():
        timed(worker, feed, 2, clock)  # warm-up
    times: dict[int, list[float]] = {p: [] for p in settings}
    in_attention: dict[int, list[float]] = {p: [] for p in settings}
    for r in range(args.rounds):
        for p, (worker, feed) in settings.items():
            step, attended = timed(worker, feed, args.steps, clock)
            times[p].append(step)
            in_attention[p].append(attended)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rows={args.rows}")
    base = args.lanes_memory_mib[0]
    for m, ts in times.items():
        paired = statistics.median(t / b for t, b in zip(ts, times[base], strict=True))
        print(
            f"lanes {m:4d} MiB ({tiers_of(settings[m][0])}): ms per step "
            f"{[round(1000 * t, 1) for t in ts]}, median {1000 * statistics.median(ts):.1f}, "
            f"/ {base} MiB: {paired:.3f}; in attention, median "
            f"{1000 * statistics.median(in_attention[m]):.1f}"
        )


if __name__ == "__main__":
    main()
