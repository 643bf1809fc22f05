"""The worker: the data plane's one entry point, `execute(plan) -> StepOutput`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from .decode_lanes import allocate_kv
from .grammar_mask import GrammarMasker
from .kv_cache import KVShape
from .loader import LoadedModel
from .model_runner import ModelRunner
from .plan import RowInput, RowOutput, StepOutput, StepPlan
from .plugins import run_stopping_plugins
from .processors import LogitsPipeline
from .sampling import Sampler
from .step_cost import attention_span

log = logging.getLogger("treadle.worker")

CPU_KV_CACHE_MEMORY = 2**30  # bytes of KV pool on the CPU when not configured
CPU_DECODE_LANES_MEMORY = 576 * 2**20  # bytes of decode lanes on the CPU when not configured
LANE_TIERS = 2  # decode lane tiers (see decode_lanes.py): rows up to L, then up to 2L


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The worker's settings: batch bound, sequence length and the KV pool's size."""

    max_batch_rows: int = 64  # most sequences in one step (a sanity bound on plans)
    max_seq_len: int | None = None  # most positions one sequence may hold; None: the model's
    #                                 context (its sliding window, if it has one)
    block_size: int = 16  # positions per KV block
    kv_cache_memory: int | None = None  # bytes of KV pool; None: 1 GiB on the CPU, on CUDA
    #                                     `kv_cache_fraction` of the memory the model leaves free,
    #                                     at most what max_batch_rows full sequences hold
    kv_cache_fraction: float = 0.85  # share of free device memory for the pool (CUDA default)
    decode_lanes_memory: int | None = None  # bytes of decode lanes (in tiers, see
    #                                         decode_lanes.py); 0: none; None: 576 MiB on the
    #                                         CPU, none on CUDA (measured on the CPU only)
    num_blocks: int | None = None  # blocks in the pool, overriding the memory budget (tests)
    seed: int | None = None  # seeds sampling of requests without their own seed

    def seq_len_for(self, loaded: LoadedModel) -> int:
        """Positions one sequence may hold: `max_seq_len`, at most the model's context."""
        limit = loaded.context_length
        window = getattr(loaded.model.config.get_text_config(), "sliding_window", None)
        if isinstance(window, int) and window > 0:  # full attention is exact inside the window
            limit = min(limit, window)
        return min(self.max_seq_len or limit, limit)

    def pool_shape(self, loaded: LoadedModel) -> KVShape:
        """The pool's geometry: `num_blocks`, else as many blocks as the memory budget holds.

        Raises ValueError (naming the setting) when the settings give no usable pool.
        """
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        one = KVShape.for_model(loaded.model.config, num_blocks=1, block_size=self.block_size)
        per_block = one.bytes_per_block(loaded.dtype)
        if self.num_blocks is not None:
            blocks, setting = self.num_blocks, "num_blocks"
        else:
            budget = self.kv_cache_memory
            if budget is None:  # no more than the running requests could ever fill
                full = (
                    self.max_batch_rows * self.seq_len_for(loaded) * (per_block // self.block_size)
                )
                budget = min(self._default_memory(loaded.device), full)
            blocks, setting = budget // per_block, "kv_cache_memory"
        if blocks < 1:
            raise ValueError(
                f"{setting}: the KV pool holds no block of {self.block_size} positions "
                f"({per_block} bytes each)"
            )
        return replace(one, num_blocks=blocks)

    def lane_tiers(self, loaded: LoadedModel, shape: KVShape) -> list[tuple[int, int]]:
        """(lanes, lane_len) of each decode lane tier: LANE_TIERS tiers, tier t holding
        max_batch_rows / 2^t lanes of L * 2^t positions (equal memory each), with L what
        the lanes' memory gives, in whole blocks; tiers past `seq_len_for` are dropped.
        Empty when L is under one block (no lanes)."""
        budget = self.decode_lanes_memory
        if budget is None:
            budget = CPU_DECODE_LANES_MEMORY if loaded.device.type == "cpu" else 0
        if budget < 0:
            raise ValueError(f"decode_lanes_memory must be >= 0, got {budget}")
        per_tier = budget // LANE_TIERS
        base = per_tier // (self.max_batch_rows * shape.bytes_per_token(loaded.dtype))
        base -= base % shape.block_size  # L
        seq_len = self.seq_len_for(loaded)
        tiers: list[tuple[int, int]] = []
        for t in range(LANE_TIERS):
            length = min(base << t, seq_len - seq_len % shape.block_size)
            if length < shape.block_size or (tiers and length <= tiers[-1][1]):
                break
            tiers.append((max(1, self.max_batch_rows >> t), length))
        return tiers

    def _default_memory(self, device: torch.device) -> int:
        if device.type != "cuda":
            return CPU_KV_CACHE_MEMORY
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * self.kv_cache_fraction)


class Worker:
    """Runs the model once per step for every row of a plan.

    Owns the model, the paged KV pool, the logits pipeline and the sampler.
    It knows nothing about requests beyond what the plan says (no gRPC, no
    asyncio); one step failing raises, and the caller fails that step's rows.
    The scheduler sizes its block tables from `num_blocks`, `block_size` and
    `max_seq_len`.
    """

    def __init__(self, loaded: LoadedModel, config: WorkerConfig | None = None) -> None:
        config = config or WorkerConfig()
        self.max_batch_rows = config.max_batch_rows
        self.max_seq_len = config.seq_len_for(loaded)
        shape = config.pool_shape(loaded)
        self.num_blocks = shape.num_blocks
        self.block_size = shape.block_size
        tiers = config.lane_tiers(loaded, shape)
        self.cache, lanes = allocate_kv(shape, tiers, loaded.dtype, loaded.device)
        self.attention_span = attention_span(loaded.model)  # for the scheduler's step budget
        log.info(
            "KV pool: %d blocks x %d positions = %d tokens, %.2f GiB (%s, %d bytes per token)",
            shape.num_blocks,
            shape.block_size,
            shape.num_tokens,
            self.cache.nbytes / 2**30,
            loaded.dtype,
            shape.bytes_per_token(loaded.dtype),
        )
        if lanes is not None:
            log.info(
                "decode lanes: %s, %.2f GiB",
                " + ".join(f"{n} x {length} positions" for n, length in tiers),
                lanes.nbytes / 2**30,
            )
        self.runner = ModelRunner(loaded, self.cache, lanes)
        self.pipeline = LogitsPipeline(loaded.vocab_size)
        self.grammar = GrammarMasker(loaded.vocab_size)
        self.sampler = Sampler(config.seed)

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step: forward, then per-request processing (processors, plugins, the
        response_format mask, warpers), choice and custom stopping for `plan.sampled_rows`
        (the output is aligned with them; empty when no row samples).

        Raises ValueError when the plan breaks the contract (a scheduler bug).
        """
        self._check(plan)
        rows = plan.sampled_rows
        started = time.perf_counter()
        logits = self.runner.forward(plan)  # [N, V]
        forwarded = time.perf_counter()
        if not rows:
            return StepOutput(rows=[], forward_seconds=forwarded - started)
        with torch.inference_mode():
            raw = logits.clone() if _wants_raw_logprobs(rows) else logits
            processed = self.pipeline(logits, rows)
            grammar_errors = self.grammar.apply(processed.scores, rows)  # before the warpers
            choice = self.sampler(raw, processed.scores, rows)
            chosen = choice.token_ids.tolist()
            failed = {**choice.errors, **processed.errors, **grammar_errors}
            advance_errors = self.grammar.advance(rows, chosen, failed)
            stops, stop_errors = run_stopping_plugins(processed.scores, choice.token_ids, rows)
        errors = {**failed, **advance_errors, **stop_errors}
        outputs = [
            RowOutput(
                token_id=token,
                logprobs=choice.logprobs[i],
                stop=i in stops,
                error=errors.get(i),
            )
            for i, token in enumerate(chosen)
        ]
        return StepOutput(
            rows=outputs,
            forward_seconds=forwarded - started,
            process_seconds=time.perf_counter() - forwarded,
        )

    def _check(self, plan: StepPlan) -> None:
        """Cheap checks of the plan's KV contract (see plan.py); a violation is a scheduler
        bug and raises ValueError naming the step and the request."""
        rows = plan.rows
        if len(rows) > self.max_batch_rows:
            raise ValueError(f"step {plan.step}: {len(rows)} rows > max_batch_rows")
        for c in plan.copies:
            if not (0 <= c.src < self.num_blocks and 0 <= c.dst < self.num_blocks):
                raise ValueError(f"step {plan.step}: {c} names a block outside the pool")
        for kind, group in (("decode", plan.decode), ("prefill", plan.prefill)):
            for r in group:
                problem = _row_problem(r, kind, self.block_size, self.num_blocks)
                if problem:
                    raise ValueError(f"step {plan.step}, request {r.request_id}: {problem}")


def _row_problem(r: RowInput, kind: str, block_size: int, num_blocks: int) -> str | None:
    """What is wrong with one row of a plan (`kind`: decode or prefill), or None."""
    n, end = len(r.input_ids), r.start + len(r.input_ids)
    if n < 1 or (kind == "decode" and n != 1):
        return f"{n} input tokens in a {kind} row"
    if r.start < 0 or end > len(r.token_ids):
        return f"positions {r.start}..{end - 1} outside its {len(r.token_ids)} tokens"
    needed = -(-end // block_size)
    if len(r.block_table) < needed:
        return f"{len(r.block_table)} blocks cover < {end} positions (block size {block_size})"
    written = r.block_table[r.start // block_size : needed]  # reads are bounds-checked by torch
    if min(written) < 0 or max(written) >= num_blocks:
        return f"block table names a block outside the pool of {num_blocks}"
    return None


def _wants_raw_logprobs(rows: list[RowInput]) -> bool:
    return any(r.params.logprobs is not None and not r.params.logprobs.processed for r in rows)
