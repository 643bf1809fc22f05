"""The ceiling: the bare model forward for one decode step, at a full batch."""

from __future__ import annotations

import time
from typing import Any

import torch

from .attention import standard_attention
from .run_result import RunResult


def ceiling_prefill_len(context: float, warmup_steps: int, timed_steps: int) -> int:
    """Prompt length to prefill so the timed steps' mean KV length is about `context`.

    Decode step k (0-based, warmup included) attends over prefill + k + 1
    positions, so the timed steps average prefill + warmup + (timed + 1) / 2.
    """
    return max(1, round(context - warmup_steps - (timed_steps + 1) / 2))


def run_ceiling(
    model: Any,
    context: float,
    batch_size: int = 64,
    timed_steps: int = 10,
    warmup_steps: int = 2,
    seed: int = 0,
) -> RunResult:
    """Time `timed_steps` decode forwards at `batch_size` rows around KV length `context`.

    The model's own DynamicCache and sdpa attention; no sampling (the next
    input is a fixed token), no mask (every row has the same length). Reports
    batch x steps / time as tokens/sec.
    """
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
        "ceiling",
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
