"""The `generate` peers on image requests: one request at a time, and static left-padded
batches (the processor batches several image chats at once)."""

from __future__ import annotations

import time
from typing import Any

import torch

from treadle.worker.loader import LoadedModel

from .attention import quiet_generation_warnings, standard_attention
from .hf_generate import greedy_config, pad_token_id
from .progress import Progress
from .run_result import RunResult, check_count
from .vlm_requests import ImageQuestion, processor_inputs


def generate_images(
    loaded: LoadedModel, items: list[ImageQuestion], max_new_tokens: int, pad: int
) -> int:
    """One greedy `generate` on `items` as one batch; return the new tokens per row
    (checked equal to `max_new_tokens`)."""
    inputs = processor_inputs(loaded.processor, items)
    inputs = {k: _on(v, loaded) for k, v in inputs.items()}
    with torch.inference_mode(), quiet_generation_warnings():
        out = loaded.model.generate(
            **inputs, generation_config=greedy_config(max_new_tokens, pad)
        )  # [B, L + new]
    new_tokens = int(out.shape[1] - inputs["input_ids"].shape[1])
    check_count("generate: new tokens per row", new_tokens, max_new_tokens)
    return new_tokens


def run_generate_images(
    loaded: LoadedModel,
    items: list[ImageQuestion],
    max_new_tokens: int,
    progress: Progress,
    batch_size: int = 1,
    warmup: bool = True,
) -> RunResult:
    """`generate` on `items` in order, `batch_size` at a time ("generate_single" for 1, else
    "generate_static<batch_size>"); every request generates exactly `max_new_tokens`."""
    name = "generate_single" if batch_size == 1 else f"generate_static{batch_size}"
    pad = pad_token_id(loaded.tokenizer)
    total = len(items) * max_new_tokens
    produced = 0
    with standard_attention(loaded.model):  # its language model's attention
        if warmup:
            generate_images(loaded, items[:batch_size], 2, pad)
        started = time.perf_counter()
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            produced += len(batch) * generate_images(loaded, batch, max_new_tokens, pad)
            progress.tokens(name, produced, total, started)
        wall = time.perf_counter() - started
    check_count(f"{name}: tokens generated", produced, total)
    return RunResult(name, len(items), produced, wall, {"batch_size": batch_size})


def _on(value: Any, loaded: LoadedModel) -> Any:
    """A processor output on the model's device, floating tensors in its dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(loaded.device, loaded.dtype)
    return value.to(loaded.device)
