"""W6 "vision": image requests on a vision-language model, treadle against `generate`.

    python bench/vlm.py [--model FOLDER] [--requests 64] [--new-tokens 32]
                        [--image-size 384] [--static-batch 16] [--streams 8]
                        [--stream-tokens 128] [--image-arrivals 8] [--out bench/results]

One process, one loaded model, runs one after another: treadle in-process (every
request submitted at once), `generate` one request at a time, `generate` on static
left-padded batches of `--static-batch`; each request is one random `--image-size`
square PNG (seeded, all distinct) and a short question, `--new-tokens` tokens, greedy,
EOS ignored; ratios treadle / each peer. Then image prefill against running text:
`--streams` text chats decode `--stream-tokens` tokens each; once each has streamed
`--warm-tokens`, `--image-arrivals` image requests arrive at once; the streams'
inter-token gaps (p50, p99, max) before and during the image prefills, and the images'
time to first token. The model: a tiny random DeepSeek-VL built for the image size
(`bench/vlm_models.py`; 384 px: 576 image tokens, as DeepSeek-VL 1.3B) unless `--model`
names a real one. Figures go to `<out>/vlm-<stamp>.json/.md` (and `vlm-latest.*`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.environment import environment
from bench.progress import Progress
from bench.report import document, ratios, title_lines, write_documents
from bench.run_result import RunResult
from bench.scenario import scenario_parser
from bench.vlm_engine import run_treadle_images
from bench.vlm_gap import GapScenario, run_image_arrivals
from bench.vlm_generate import run_generate_images
from bench.vlm_models import build_vlm
from bench.vlm_requests import (
    ImageQuestion,
    image_questions,
    processor_prompt_ids,
    text_chat,
)
from treadle.scheduler.engine import EngineConfig
from treadle.worker.loader import LoadedModel, converted_gguf, embedded_gguf_path, load_model

REPO = Path(__file__).resolve().parent.parent
RUNS = ("treadle", "generate_single", "generate_static", "image_arrivals")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = scenario_parser(__doc__.split("\n\n")[0], REPO / "bench" / "results")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens of each image request")
    ap.add_argument("--image-size", type=int, default=384, help="pictures' side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="pictures: seeds seed .. seed+requests")
    ap.add_argument("--static-batch", type=int, default=16, help="rows of a generate batch")
    ap.add_argument("--streams", type=int, default=8, help="text streams decoding")
    ap.add_argument("--stream-tokens", type=int, default=128, help="new tokens of each stream")
    ap.add_argument("--image-arrivals", type=int, default=8, help="images arriving at once")
    ap.add_argument(
        "--warm-tokens", type=int, default=16, help="tokens of each stream before images arrive"
    )
    ap.add_argument("--max-batch-rows", type=int, default=64)
    ap.add_argument("--step-token-budget", type=int, default=None, help="None: engine default")
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="None: engine default")
    ap.add_argument("--threads", type=int, default=None, help="torch threads; None: its own")
    ap.add_argument("--no-warmup", action="store_true", help="no untimed call before each run")
    ap.add_argument("--skip", nargs="*", default=[], choices=RUNS, help="runs not to run")
    return ap.parse_args(argv)


def tiny_vlm(folder: Path, image_size: int) -> Path:
    """Build the tests' tiny random DeepSeek-VL for `image_size` pictures into `folder`."""
    smol = converted_gguf(embedded_gguf_path())
    return Path(build_vlm("deepseek_vl", smol, folder, image_size=image_size))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_batch_rows=args.max_batch_rows,
        step_token_budget=args.step_token_budget,
        kv_cache_memory=args.kv_cache_memory,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = datetime.now(UTC)
    progress = Progress(label="vlm")
    with tempfile.TemporaryDirectory(prefix="treadle-vlm-") as tmp:
        spec = args.model or str(tiny_vlm(Path(tmp), args.image_size))
        loaded = load_model(spec, device=args.device)
        if not loaded.accepts_images:
            raise SystemExit(f"--model {spec}: not a vision-language model")
        return run_vlm(args, loaded, started, progress)


def run_vlm(
    args: argparse.Namespace, loaded: LoadedModel, started: datetime, progress: Progress
) -> int:
    """The runs in order; the report rewritten after each, printed at the end."""
    items = image_questions(args.requests + 1, args.image_size, args.seed)
    items, warmup = items[:-1], (None if args.no_warmup else items[-1])
    config = engine_config(args)
    header = _header(args, loaded, items, config, started)
    progress.say(f"{header['model']}; {header['workload']}")
    results: dict[str, RunResult] = {}
    runs: dict[str, Any] = {
        "treadle": lambda: run_treadle_images(
            loaded, items, config, args.new_tokens, progress, warmup
        ),
        "generate_single": lambda: run_generate_images(
            loaded, items, args.new_tokens, progress, 1, warmup is not None
        ),
        "generate_static": lambda: run_generate_images(
            loaded, items, args.new_tokens, progress, args.static_batch, warmup is not None
        ),
    }
    for key, run in runs.items():
        if key in args.skip:
            continue
        progress.say(f"{key}: start")
        result = run()
        results[result.name] = result
        progress.say(f"{result.name}: {result.tokens_per_s:.1f} tok/s, {result.wall_s:.1f} s")
        _write(args, results, header, started)
    if "image_arrivals" not in args.skip:
        header["image_arrivals"] = run_image_arrivals(loaded, config, gap_scenario(args), progress)
    print(render(_write(args, results, header, started)))
    return 0


def gap_scenario(args: argparse.Namespace) -> GapScenario:
    """`--streams` text chats; `--image-arrivals` image requests, pictures none of the
    throughput runs had (seeds after theirs and the warmup's)."""
    arrivals = image_questions(args.image_arrivals, args.image_size, args.seed + args.requests + 1)
    return GapScenario(
        streams=[text_chat(i, args.stream_tokens) for i in range(args.streams)],
        images=[q.generation_request(args.new_tokens) for q in arrivals],
        warm_tokens=args.warm_tokens,
    )


def _header(
    args: argparse.Namespace,
    loaded: LoadedModel,
    items: list[ImageQuestion],
    config: EngineConfig,
    started: datetime,
) -> dict[str, Any]:
    """The report's command, model, workload, settings and environment."""
    prompts = [processor_prompt_ids(loaded.processor, i) for i in items]
    image_tokens = sum(t == loaded.image_token_id for t in prompts[0])
    model = loaded.name
    if args.model is None:
        model = f"tiny random DeepSeek-VL ({args.image_size} px, {image_tokens} image tokens)"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "command": [sys.executable, *sys.argv],
        "model": model,
        "workload": {
            "requests": len(items),
            "useful_tokens": len(items) * args.new_tokens,
            "new_tokens": args.new_tokens,
            "image_size": args.image_size,
            "image_tokens": image_tokens,
            "prompt_tokens": sum(len(p) for p in prompts),
        },
        "settings": {
            **settings,
            "engine": dataclasses.asdict(config),
            "device": str(loaded.device),
            "dtype": str(loaded.dtype),
        },
        "environment": environment(),
    }


def _write(
    args: argparse.Namespace,
    results: dict[str, RunResult],
    header: dict[str, Any],
    started: datetime,
) -> dict[str, Any]:
    report = document("VLM", results, ratios(results), [], started, header)
    write_documents("vlm", report, render(report), args.out, started)
    return report


def render(report: dict[str, Any]) -> str:
    """The markdown summary: throughput runs and ratios, then the image-arrivals scenario."""
    wl = report["workload"]
    lines = [
        *title_lines(report, "VLM"),
        f"Each request: one {wl['image_size']}x{wl['image_size']} picture "
        f"({wl['image_tokens']} image tokens) and a question, {wl['new_tokens']} new tokens; "
        f"{wl['prompt_tokens']:,} prompt tokens in all.",
        "",
        "| run | requests | tokens | wall s | tok/s | treadle / run |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in report["runs"].items():
        ratio = report["ratios"].get(f"treadle/{name}")
        lines.append(
            f"| {name} | {run['requests']} | {run['useful_tokens']:,} | {run['wall_s']:.2f} "
            f"| {run['tokens_per_s']:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    if (t := report["runs"].get("treadle")) is not None:
        lines += [
            "",
            f"treadle: {t['steps']:,} steps ({t['prefill_steps']:,} with prefill), mean decode "
            f"batch {t['mean_decode_batch']}; TTFT p50/p99 {t['ttft_s'].get('p50')}/"
            f"{t['ttft_s'].get('p99')} s, e2e p50/p99 {t['e2e_s'].get('p50')}/"
            f"{t['e2e_s'].get('p99')} s",
        ]
    return "\n".join([*lines, *_arrival_lines(report)]) + "\n"


def _arrival_lines(report: dict[str, Any]) -> list[str]:
    gap = report.get("image_arrivals")
    if gap is None:
        return []
    s = report["settings"]
    rows = (
        ("before the images", gap["text_gap_before_s"]),
        (f"during image prefill ({gap['image_prefill_window_s']} s)", gap["text_gap_during_s"]),
    )
    ttft = gap["image_ttft_s"]
    return [
        "",
        "## Image prefill and running text streams",
        "",
        f"{s['streams']} text streams decode {s['stream_tokens']} tokens each; once each has "
        f"{s['warm_tokens']}, {s['image_arrivals']} image requests arrive at once "
        f"({gap['streams_through_window']} streams still decoding when the last image's "
        "first token came).",
        "",
        "| text streams' inter-token gap | p50 s | p99 s | max s |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {g.get('p50')} | {g.get('p99')} | {g.get('max')} |" for name, g in rows),
        "",
        f"Image requests' TTFT p50/p99/max: {ttft.get('p50')}/{ttft.get('p99')}/"
        f"{ttft.get('max')} s",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
