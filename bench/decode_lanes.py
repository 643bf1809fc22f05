"""Microbenchmark: a W1-like step with and without decode lanes, interleaved.

    python bench/decode_lanes.py [--rows 50] [--lanes-positions 0 128 192] [--rounds 7]

One SmolLM2 worker per setting (lanes of N positions for each of 64 batch
rows; 0 = none, every decode row gathered from the pool). Every step feeds
`--rows` decoding rows whose contexts spread over W1's range (36..183
positions, each growing by one a step and starting over as a new request
past the end) and one prompt chunk of 18 tokens after a 24-token cached
prefix (a W1 prompt after its prefix-cache hit). Rows keep their history
objects across steps, as requests do, so lanes persist. The settings run in
turn, `--steps` steps each, for `--rounds` rounds; prints ms per step per
round, the medians and each setting's paired ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the treadle packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treadle.worker.history import TokenHistory
from treadle.worker.kv_cache import KVShape
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


def worker_for(loaded: LoadedModel, positions: int) -> Worker:
    shape = KVShape.for_model(loaded.model.config, num_blocks=1, block_size=16)
    # the memory that gives `positions` per lane (a little over, so whole blocks come out)
    memory = BATCH_ROWS * (positions + 8) * shape.bytes_per_token(loaded.dtype)
    config = WorkerConfig(max_batch_rows=BATCH_ROWS, max_seq_len=256, decode_lanes_memory=memory)
    worker = Worker(loaded, config)
    got = worker.runner.lanes.lane_len if worker.runner.lanes is not None else 0
    if got != positions:
        raise SystemExit(f"--lanes-positions {positions}: the lanes came out at {got}")
    return worker


def timed(worker: Worker, feed: Feed, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        worker.execute(feed.plan())
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50, help="decoding rows (W1's mean batch: 50)")
    ap.add_argument("--lanes-positions", type=int, nargs="+", default=[0, 128, 192])
    ap.add_argument("--steps", type=int, default=8, help="steps per setting per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    loaded = load_model(None)
    settings = {p: (worker_for(loaded, p), Feed(args.rows, 16)) for p in args.lanes_positions}
    for worker, feed in settings.values():
        timed(worker, feed, 2)  # warm-up
    times: dict[int, list[float]] = {p: [] for p in settings}
    for r in range(args.rounds):
        for p, (worker, feed) in settings.items():
            times[p].append(timed(worker, feed, args.steps))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rows={args.rows}")
    base = args.lanes_positions[0]
    for p, ts in times.items():
        paired = statistics.median(t / b for t, b in zip(ts, times[base], strict=True))
        print(
            f"lanes {p:4d} positions: ms per step {[round(1000 * t, 1) for t in ts]}, "
            f"median {1000 * statistics.median(ts):.1f}, / lanes {base}: {paired:.3f}"
        )


if __name__ == "__main__":
    main()
