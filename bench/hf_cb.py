"""Peer: transformers' own continuous batching, every request submitted at once."""

from __future__ import annotations

import time
from typing import Any

from .attention import standard_attention
from .hf_generate import greedy_config, pad_token_id
from .progress import Progress
from .run_result import BenchmarkError, RunResult, check_count
from .workload import Workload

NO_EOS = -1  # an `eos_token_id` no token has: each request runs to its budget


def run_transformers_cb(
    model: Any,
    tokenizer: Any,
    workload: Workload,
    progress: Progress,
    num_blocks: int | None = None,
    max_batch_tokens: int | None = None,
    result_timeout_s: float = 600.0,
) -> RunResult:
    """transformers' continuous batching; settings left at None are transformers' defaults.

    `generate_batch` takes one `max_new_tokens` for all requests, so this uses
    the manager it wraps: `init_continuous_batching` with the same workload
    hints `generate_batch` would give, its warmup (untimed), then one
    `add_request` per request with that request's budget. Timed from the
    first submission to the last result. Raises BenchmarkError if a request
    fails or produces other than its budget.
    """
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in workload.prompts),
        max_generated_length=max(workload.budgets),
        num_requests=len(workload.items),
    )
    config = greedy_config(max(workload.budgets), pad_token_id(tokenizer))
    with standard_attention(model):
        manager = model.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(
                num_blocks=num_blocks, max_batch_tokens=max_batch_tokens
            ),
            workload_hints=hints,
        )
        try:
            manager.warmup()  # builds the paged cache, sized from memory unless told
            sizing = _cache_sizing(manager)
            manager.start()
            started = time.perf_counter()
            budgets = _submit_all(manager, workload)
            produced = _collect(manager, budgets, progress, started, result_timeout_s)
            wall = time.perf_counter() - started
        finally:
            manager.stop(block=True)
            manager.destroy()
    check_count("transformers_cb: tokens produced", produced, workload.useful_tokens)
    return RunResult("transformers_cb", len(workload.items), produced, wall, sizing)


def _cache_sizing(manager: Any) -> dict[str, Any]:
    """The paged cache's resolved size (transformers internals: best effort, for the record)."""
    cache = getattr(manager.batch_processor, "cache", None)
    return {
        name: getattr(cache, name)
        for name in ("num_blocks", "max_batch_tokens")
        if isinstance(getattr(cache, name, None), int)
    }


def _submit_all(manager: Any, workload: Workload) -> dict[str, int]:
    """Queue every request; return each request id's budget."""
    budgets: dict[str, int] = {}
    for i, (prompt, budget) in enumerate(zip(workload.prompts, workload.budgets, strict=True)):
        request_id = f"w1-{i}"
        manager.add_request(
            list(prompt), request_id=request_id, max_new_tokens=budget, eos_token_id=NO_EOS
        )
        budgets[request_id] = budget
    return budgets


def _collect(
    manager: Any, budgets: dict[str, int], progress: Progress, started: float, timeout_s: float
) -> int:
    """Wait for every request's final result; check each produced its budget; return the total."""
    total = sum(budgets.values())
    pending = dict(budgets)
    produced = 0
    while pending:
        result = manager.get_result(timeout=timeout_s)
        if result is None:
            raise BenchmarkError(
                f"transformers_cb: no result within {timeout_s} s ({len(pending)} requests pending)"
            )
        if not result.is_finished():
            continue
        if result.error is not None:
            raise BenchmarkError(
                f"transformers_cb: request {result.request_id} failed: {result.error}"
            )
        budget = pending.pop(result.request_id)
        check_count(
            f"transformers_cb: tokens of {result.request_id}", len(result.generated_tokens), budget
        )
        produced += budget
        progress.tokens("transformers_cb", produced, total, started)
    return produced
