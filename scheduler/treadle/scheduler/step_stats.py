"""What one step did, for metrics and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import FinishEvent


@dataclass(frozen=True, slots=True)
class StepStats:
    step: int
    decode_rows: int  # rows that generated a token from a decode
    prefill_rows: int  # requests prefilled (and given their first token)
    prefill_tokens: int  # prompt tokens run this step
    forward_s: float  # seconds in the model forward
    process_s: float  # seconds in logits processing and sampling
    step_s: float  # seconds for the step: schedule, execute, update (delivery follows)
    running: int  # requests holding a row after the step
    waiting: int  # requests queued after the step
    generated_tokens: int = 0  # tokens accepted this step (rows that failed produce none)
    inter_token_s: list[float] = field(default_factory=list)  # per row: gap since its last token
    finished: list[FinishEvent] = field(default_factory=list)  # requests that ended this step

    @property
    def outside_forward_s(self) -> float:
        """The scheduler's share: everything in the step but the model forward."""
        return self.step_s - self.forward_s
