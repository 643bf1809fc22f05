"""Peers built on `model.generate`: one request at a time, and static left-padded batches."""

from __future__ import annotations

import time
from typing import Any

import torch

from .attention import quiet_generation_warnings, standard_attention
from .progress import Progress
from .run_result import RunResult, check_count
from .workload import Workload


def greedy_config(max_new_tokens: int, pad_token_id: int) -> Any:
    """Greedy, exactly `max_new_tokens`: `eos_token_id=-1` means no token ends generation.

    (`min_new_tokens` would instead mask EOS and change the greedy choice; the
    engine's `ignore_eos` lets EOS be chosen and goes on, as this does.)
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=pad_token_id,
    )


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: has neither a pad nor an EOS token to pad with")
    return int(pad)


def left_padded(prompts: list[tuple[int, ...]], pad: int, device: Any) -> tuple[Any, Any]:
    """Input ids and attention mask for `prompts`, left-padded to the longest: both `[B, L]`."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, L]
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def generate_batch(
    model: Any, prompts: list[tuple[int, ...]], max_new_tokens: int, pad: int
) -> int:
    """Run one greedy `generate` on `prompts`; return the new tokens per row (checked equal)."""
    ids, mask = left_padded(prompts, pad, model.device)
    with torch.inference_mode(), quiet_generation_warnings():
        out = model.generate(
            ids, attention_mask=mask, generation_config=greedy_config(max_new_tokens, pad)
        )
    new_tokens = int(out.shape[1] - ids.shape[1])
    check_count("generate: new tokens per row", new_tokens, max_new_tokens)
    return new_tokens


def run_generate_single(
    model: Any, tokenizer: Any, workload: Workload, progress: Progress, warmup: bool = True
) -> RunResult:
    """`model.generate` one request at a time, in order; every request runs to its budget.

    Tokens/sec is a rate over the requests given (DESIGN: the first 16).
    """
    pad = pad_token_id(tokenizer)
    with standard_attention(model):
        if warmup:
            generate_batch(model, [workload.prompts[0]], 2, pad)
        started = time.perf_counter()
        for i, (prompt, budget) in enumerate(zip(workload.prompts, workload.budgets, strict=True)):
            generate_batch(model, [prompt], budget, pad)
            progress.tokens(
                "generate_single", sum(workload.budgets[: i + 1]), workload.useful_tokens, started
            )
        wall = time.perf_counter() - started
    return RunResult("generate_single", len(workload.items), workload.useful_tokens, wall)


def run_generate_static(
    model: Any,
    tokenizer: Any,
    workload: Workload,
    progress: Progress,
    batch_size: int = 64,
    warmup: bool = True,
) -> RunResult:
    """`model.generate` on static left-padded batches in arrival order, each to its longest budget.

    Only the budgets count as useful; `computed_tokens` is what the batches
    actually generated (rows x longest budget).
    """
    pad = pad_token_id(tokenizer)
    computed = 0
    done = 0
    with standard_attention(model):
        if warmup:
            generate_batch(model, list(workload.prompts[:batch_size]), 2, pad)
        started = time.perf_counter()
        for start in range(0, len(workload.items), batch_size):
            prompts = list(workload.prompts[start : start + batch_size])
            budgets = workload.budgets[start : start + batch_size]
            computed += len(prompts) * generate_batch(model, prompts, max(budgets), pad)
            done += sum(budgets)
            progress.say(
                f"generate_static{batch_size}: batch of {len(prompts)} done, "
                f"{done:,}/{workload.useful_tokens:,} useful tokens"
            )
        wall = time.perf_counter() - started
    return RunResult(
        f"generate_static{batch_size}",
        len(workload.items),
        workload.useful_tokens,
        wall,
        {"batch_size": batch_size, "computed_tokens": computed},
    )
