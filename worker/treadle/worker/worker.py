"""The worker: the data plane's one entry point, `execute(plan) -> StepOutput`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .kv_cache import KVShape, SlotKVCache
from .loader import LoadedModel
from .model_runner import ModelRunner
from .plan import RowInput, RowOutput, StepOutput, StepPlan
from .plugins import run_stopping_plugins
from .processors import LogitsPipeline
from .sampling import Sampler

log = logging.getLogger("treadle.worker")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    max_batch_rows: int = 64  # KV rows: sequences running at once
    max_seq_len: int | None = None  # KV positions per row; None: min(model context, 2048)
    seed: int | None = None  # seeds sampling of requests without their own seed
    prefix_cache_rows: int = 0  # KV rows after max_batch_rows, for the prefix cache

    def seq_len_for(self, loaded: LoadedModel) -> int:
        limit = loaded.context_length
        window = getattr(loaded.model.config, "sliding_window", None)
        if isinstance(window, int) and window > 0:  # full attention is exact inside the window
            limit = min(limit, window)
        return min(self.max_seq_len or 2048, limit)


class Worker:
    """Runs the model once per step for every row of a plan.

    Owns the model, the slot KV cache, the logits pipeline and the sampler.
    It knows nothing about requests beyond what the plan says (no gRPC, no
    asyncio); one step failing raises, and the caller fails that step's rows.
    """

    def __init__(self, loaded: LoadedModel, config: WorkerConfig | None = None) -> None:
        config = config or WorkerConfig()
        self.max_batch_rows = config.max_batch_rows
        self.max_seq_len = config.seq_len_for(loaded)
        shape = KVShape.for_model(
            loaded.model.config, self.max_batch_rows + config.prefix_cache_rows, self.max_seq_len
        )
        self.cache = SlotKVCache(shape, loaded.dtype, loaded.device)
        log.info(
            "KV cache: %d rows x %d positions, %.2f GiB (%s, %d bytes per token)",
            shape.rows,
            shape.max_len,
            self.cache.nbytes / 2**30,
            loaded.dtype,
            shape.bytes_per_token(loaded.dtype),
        )
        self.runner = ModelRunner(loaded, self.cache)
        self.pipeline = LogitsPipeline(loaded.vocab_size)
        self.sampler = Sampler(config.seed)

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step: forward, per-request processing, choice, custom stopping."""
        rows = plan.rows
        _check_layout(plan)
        started = time.perf_counter()
        logits = self.runner.forward(plan)  # [N, V]
        forwarded = time.perf_counter()
        with torch.inference_mode():
            raw = logits.clone() if _wants_raw_logprobs(rows) else logits
            processed = self.pipeline(logits, rows)
            choice = self.sampler(raw, processed.scores, rows)
            stops, stop_errors = run_stopping_plugins(processed.scores, choice.token_ids, rows)
        errors = {**choice.errors, **processed.errors, **stop_errors}
        outputs = [
            RowOutput(
                token_id=token,
                logprobs=choice.logprobs[i],
                stop=i in stops,
                error=errors.get(i),
            )
            for i, token in enumerate(choice.token_ids.tolist())
        ]
        return StepOutput(
            rows=outputs,
            forward_seconds=forwarded - started,
            process_seconds=time.perf_counter() - forwarded,
        )


def _wants_raw_logprobs(rows: list[RowInput]) -> bool:
    return any(r.params.logprobs is not None and not r.params.logprobs.processed for r in rows)


def _check_layout(plan: StepPlan) -> None:
    """The plan must follow the slot layout (see plan.py); a violation is a scheduler bug."""
    for i, r in enumerate(plan.rows):
        if r.row != i:
            raise ValueError(f"step {plan.step}: row {r.row} planned at position {i}")
