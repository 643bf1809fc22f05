"""The contract between scheduler and worker: a step's plan and its output.

Every step the scheduler hands the worker a `StepPlan`; the worker runs the
model once for all of it and returns a `StepOutput`; the scheduler applies
that output to its requests. The worker keeps no per-request state besides
the KV rows, so everything it needs about a row is in the plan.

Row layout (slot-based): active sequences occupy the leading rows of the KV
cache. Rows that decode this step are rows 0..D-1, one token each; rows that
prefill this step follow them, D..D+P-1, their whole prompt each. After the
step all D+P rows are active. `moves` compacts the rows freed by the previous
step: each copies a sequence's KV from a higher row into a freed lower one,
and is applied, in order, before the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..api.outcome import TokenLogprob
from .params import SamplingParams


@dataclass(slots=True)
class RowInput:
    """One sequence in the step, as the worker sees it."""

    request_id: str  # for errors and logs
    row: int  # the KV row the sequence occupies
    input_ids: Sequence[int]  # fed this step: the prompt on prefill, the last token on decode
    start: int  # position of input_ids[0]: tokens of this sequence already in the KV row
    token_ids: Sequence[int]  # the whole sequence so far (prompt + generated), ends with input_ids
    prompt_len: int  # how many of token_ids are the prompt
    params: SamplingParams  # processors and choice for the next token

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len


@dataclass(frozen=True, slots=True)
class RowMove:
    """Copy the first `length` KV positions of row `src` into row `dst`."""

    src: int
    dst: int
    length: int


@dataclass(slots=True)
class StepPlan:
    """What the worker does this step."""

    step: int  # step counter, for logs
    decode: list[RowInput] = field(default_factory=list)  # rows 0..D-1 in order, one token each
    prefill: list[RowInput] = field(default_factory=list)  # rows D..D+P-1 in order, whole prompts
    moves: list[RowMove] = field(default_factory=list)  # applied in order before the forward

    @property
    def rows(self) -> list[RowInput]:
        """All rows in row order; `StepOutput.rows` is aligned with this list."""
        return self.decode + self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(len(r.input_ids) for r in self.prefill)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass(slots=True)
class RowOutput:
    """What one row produced this step."""

    token_id: int  # the chosen next token (-1 when `error` is set)
    logprobs: TokenLogprob | None = None  # when the request asked for them
    stop: bool = False  # a custom stopping criterion of the request fired
    error: str | None = None  # this row failed (a plugin raised); the others are unaffected


@dataclass(slots=True)
class StepOutput:
    """The worker's answer to a `StepPlan`."""

    rows: list[RowOutput]  # aligned with `StepPlan.rows`
    forward_seconds: float = 0.0  # seconds spent in the model forward
    process_seconds: float = 0.0  # seconds spent in logits processing and sampling
