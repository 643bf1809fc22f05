"""Until the gRPC service exists: run the engine in-process on a few prompts and stream them."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from .engine import Engine, EngineConfig
from .events import FinishEvent, TokenEvent
from .generation_request import ChatMessage, GenerationRequest

_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give three tips for learning to code.",
    "Explain photosynthesis in one sentence.",
)


def run_demo(args: argparse.Namespace) -> int:
    """Load the model, run the demo prompts concurrently, print them as they stream."""
    from ..worker.plugins import default_registry

    plugins = default_registry()
    for spec in args.plugin:
        plugins.load(spec)
    engine = Engine.load(
        EngineConfig(
            model=args.model,
            device=args.device,
            max_batch_rows=args.max_batch_rows,
            max_seq_len=args.max_seq_len,
            prefill_token_budget=args.prefill_token_budget,
            max_waiting=args.max_waiting,
            seed=args.seed,
        ),
        plugins,
    )
    engine.start()
    try:
        asyncio.run(_stream_all(engine))
    finally:
        engine.stop()
    return 0


async def _stream_all(engine: Engine) -> None:
    started = time.monotonic()
    texts = {i: "" for i in range(len(_PROMPTS))}

    async def one(i: int, prompt: str) -> None:
        req = GenerationRequest(
            messages=[ChatMessage("user", prompt)], max_new_tokens=96, request_id=f"demo-{i}"
        )
        async for event in engine.generate(req):
            if isinstance(event, TokenEvent):
                texts[i] += event.text
            elif isinstance(event, FinishEvent):
                print(
                    f"\n[{i}] {prompt}\n{texts[i].strip()}\n  ({event.reason.value}, "
                    f"{event.usage.generated_tokens} tokens, "
                    f"first token after {event.usage.time_to_first_token_s or 0:.2f} s)",
                    file=sys.stdout,
                    flush=True,
                )

    await asyncio.gather(*(one(i, p) for i, p in enumerate(_PROMPTS)))
    print(f"\n{len(_PROMPTS)} requests in {time.monotonic() - started:.1f} s", flush=True)
