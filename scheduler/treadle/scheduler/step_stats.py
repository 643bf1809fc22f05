"""What one step did, for metrics and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..worker.plan import StepOutput, StepPlan
from .events import FinishEvent
from .scheduler import StepTokens


@dataclass(frozen=True, slots=True)
class StepStats:
    step: int
    decode_rows: int  # rows that generated a token from a decode
    prefill_rows: int  # rows that fed a chunk of their prompt (or recomputed tokens)
    prefill_tokens: int  # tokens those rows fed
    forward_seconds: float  # seconds in the model forward
    process_seconds: float  # seconds in logits processing and sampling
    step_seconds: float  # seconds for the step: schedule, execute, update (delivery follows)
    running: int  # requests holding a row after the step
    waiting: int  # requests queued after the step
    preempted: int = 0  # running requests sent back to the queue this step
    kv_blocks_used: int = 0  # KV blocks held after the scheduling (cached free ones excluded)
    generated_tokens: int = 0  # tokens accepted this step (rows that failed produce none)
    inter_token_seconds: list[float] = field(default_factory=list)  # per row, since its last
    finished: list[FinishEvent] = field(default_factory=list)  # requests that ended this step

    @property
    def outside_forward_seconds(self) -> float:
        """The scheduler's share: everything in the step but the model forward."""
        return self.step_seconds - self.forward_seconds


def step_stats(
    plan: StepPlan,
    output: StepOutput | None,
    tokens: StepTokens,
    *,
    running: int,
    waiting: int,
    preempted: int = 0,
    kv_blocks_used: int = 0,
    step_seconds: float,
) -> StepStats:
    """The figures of a step from its plan, the worker's output (None when it produced
    none) and the tokens the update accepted; `finished` is left for the caller."""
    return StepStats(
        step=plan.step,
        decode_rows=len(plan.decode),
        prefill_rows=len(plan.prefill),
        prefill_tokens=plan.num_tokens - len(plan.decode),
        forward_seconds=output.forward_seconds if output else 0.0,
        process_seconds=output.process_seconds if output else 0.0,
        step_seconds=step_seconds,
        running=running,
        waiting=waiting,
        preempted=preempted,
        kv_blocks_used=kv_blocks_used,
        generated_tokens=tokens.count,
        inter_token_seconds=tokens.inter_token_seconds,
    )
