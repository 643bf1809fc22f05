"""W1 "saturation": treadle and its peers side by side, in one process, on one loaded model.

    python bench/w1.py [--requests N] [--out bench/results] [--skip RUN ...] [--model SPEC]

Progress goes to stderr; the markdown summary to stdout; every figure to
`<out>/w1-<UTC stamp>.json` and `.md` (and `w1-latest.*`), rewritten after
each run so a failure late in a long run keeps what was measured. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.bench_start import start_bench
from bench.ceiling import CeilingSteps, run_ceiling, run_ceiling_process
from bench.cli_args import common_parser
from bench.hf_cb import run_transformers_cb
from bench.hf_generate import run_generate_single, run_generate_static
from bench.progress import Progress
from bench.report import build_report, render_markdown, write_report
from bench.run_result import RunResult
from bench.settings import RUN_KEYS, W1Settings
from bench.treadle_run import run_treadle
from bench.workload import Workload
from treadle.worker.loader import LoadedModel

REPO = Path(__file__).resolve().parent.parent

Runner = Callable[[LoadedModel, Workload, W1Settings, Progress], RunResult]


def _treadle(loaded: LoadedModel, wl: Workload, s: W1Settings, p: Progress) -> RunResult:
    return run_treadle(loaded, wl, s.engine_config(), p, clients=s.clients, warmup=s.warmup)


def _single(loaded: LoadedModel, wl: Workload, s: W1Settings, p: Progress) -> RunResult:
    head = wl.head(s.single_requests)
    return run_generate_single(loaded.model, loaded.tokenizer, head, p, warmup=s.warmup)


def _static(loaded: LoadedModel, wl: Workload, s: W1Settings, p: Progress) -> RunResult:
    return run_generate_static(
        loaded.model, loaded.tokenizer, wl, p, batch_size=s.static_batch, warmup=s.warmup
    )


def _cb(loaded: LoadedModel, wl: Workload, s: W1Settings, p: Progress) -> RunResult:
    return run_transformers_cb(
        loaded.model,
        loaded.tokenizer,
        wl,
        p,
        num_blocks=s.cb_num_blocks,
        max_batch_tokens=s.cb_max_batch_tokens,
    )


def _ceiling_steps(s: W1Settings) -> CeilingSteps:
    return CeilingSteps(s.ceiling_batch, s.ceiling_steps, s.ceiling_warmup)


def _ceiling(loaded: LoadedModel, wl: Workload, s: W1Settings, p: Progress) -> RunResult:
    return run_ceiling(loaded.model, wl.mean_decode_context, _ceiling_steps(s))


def _ceiling_before(loaded: LoadedModel, wl: Workload, s: W1Settings, p: Progress) -> RunResult:
    return run_ceiling_process(
        s.model,
        wl.mean_decode_context,
        _ceiling_steps(s),
        threads=s.threads,
        device=s.device,
        name="ceiling_before",
    )


# In the order they run. treadle before the peers: they switch the model to sdpa and back.
RUNNERS: tuple[tuple[str, Runner], ...] = (
    ("ceiling_before", _ceiling_before),
    ("treadle", _treadle),
    ("generate_single", _single),
    ("generate_static", _static),
    ("transformers_cb", _cb),
    ("ceiling", _ceiling),
)


def run_w1(
    loaded: LoadedModel,
    workload: Workload,
    settings: W1Settings,
    progress: Progress,
    on_result: Callable[[dict[str, RunResult]], None] | None = None,
) -> dict[str, RunResult]:
    """Run every run not skipped, in RUNNERS order; return the results by run name.

    `on_result` is called with the results so far after each run.
    """
    results: dict[str, RunResult] = {}
    for key, runner in RUNNERS:
        if key in settings.skip:
            continue
        progress.say(f"{key}: start")
        result = runner(loaded, workload, settings, progress)
        results[result.name] = result
        progress.say(
            f"{result.name}: done, {result.useful_tokens:,} tokens in {result.wall_s:.1f} s, "
            f"{result.tokens_per_s:.1f} tok/s"
        )
        if on_result is not None:
            on_result(results)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = W1Settings()
    ap = common_parser(__doc__, REPO, d)
    ap.add_argument(
        "--skip",
        nargs="+",
        choices=RUN_KEYS,
        default=[],
        metavar="RUN",
        help=f"runs to leave out: {', '.join(RUN_KEYS)}",
    )
    ap.add_argument(
        "--decode-lanes-memory",
        type=int,
        default=d.decode_lanes_memory,
        help="engine: bytes of decode lanes, 0 = none; None: the engine's default (576 MiB on CPU)",
    )
    ap.add_argument(
        "--single-requests", type=int, default=d.single_requests, help="generate_single's first N"
    )
    ap.add_argument(
        "--static-batch", type=int, default=d.static_batch, help="generate_static's batch rows"
    )
    ap.add_argument("--cb-num-blocks", type=int, default=None, help="None: transformers'")
    ap.add_argument(
        "--cb-max-batch-tokens", type=int, default=None, help="None: transformers' default"
    )
    ap.add_argument("--ceiling-batch", type=int, default=d.ceiling_batch, help="rows")
    ap.add_argument("--ceiling-steps", type=int, default=d.ceiling_steps, help="timed steps")
    ap.add_argument("--ceiling-warmup", type=int, default=d.ceiling_warmup, help="untimed steps")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> W1Settings:
    return W1Settings(
        requests=args.requests,
        skip=frozenset(args.skip),
        warmup=not args.no_warmup,
        model=args.model,
        device=args.device,
        threads=args.threads,
        clients=args.clients,
        max_batch_rows=args.max_batch_rows,
        max_seq_len=args.max_seq_len,
        step_token_budget=args.step_token_budget,
        kv_cache_memory=args.kv_cache_memory,
        decode_lanes_memory=args.decode_lanes_memory,
        prefix_cache=args.prefix_cache,
        single_requests=args.single_requests,
        static_batch=args.static_batch,
        cb_num_blocks=args.cb_num_blocks,
        cb_max_batch_tokens=args.cb_max_batch_tokens,
        ceiling_batch=args.ceiling_batch,
        ceiling_steps=args.ceiling_steps,
        ceiling_warmup=args.ceiling_warmup,
    )


def main(argv: list[str] | None = None) -> int:
    """Load the model and workload, run W1, write and print the report."""
    args = parse_args(argv)
    settings = settings_from(args)
    command = sys.argv if argv is None else [__file__, *argv]
    run = start_bench(args, settings, command, label="w1")
    started, progress, context = run.started, run.progress, run.context

    def save(results: dict[str, RunResult]) -> None:
        write_report(build_report(results, **context), args.out, started)

    results = run_w1(run.loaded, run.workload, settings, progress, on_result=save)
    report = build_report(results, **context)
    paths = write_report(report, args.out, started)
    progress.say(f"results: {', '.join(str(p) for p in paths)}")
    print(render_markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
