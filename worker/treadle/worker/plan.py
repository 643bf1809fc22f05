"""The contract between scheduler and worker: a step's plan and its output.

Every step the scheduler hands the worker a `StepPlan`; the worker runs the
model once for all of it and returns a `StepOutput`; the scheduler applies
that output to its requests. The worker keeps no per-request state besides
the KV blocks, so everything it needs about a row is in the plan.

KV layout (paged): the keys and values of every sequence live in fixed-size
blocks of `block_size` positions from one pool shared by all sequences.
Position p of a sequence is slot `p % block_size` of block
`block_table[p // block_size]`; the scheduler owns the block tables, the
worker only reads and writes the blocks they name. A row feeds a run of
consecutive tokens of its sequence: one token when it decodes, a chunk of the
prompt (or, after a preemption, of prompt + generated tokens) when it
prefills; a prompt may take many steps. Only rows whose chunk reaches the end
of their known sequence (`RowInput.samples`) get a next token chosen.
`copies` are applied, in order, before the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..api.outcome import TokenLogprob
from .grammar import GrammarState
from .history import TokenHistory
from .params import SamplingParams
from .vision import ImageInputs


@dataclass(slots=True)
class RowInput:
    """One sequence in the step, as the worker sees it."""

    request_id: str  # for errors and logs
    sample: int  # which sample of the request (0..n-1); with request_id, names the sequence
    input_ids: Sequence[int]  # fed this step: token_ids[start : start + len(input_ids)]
    start: int  # position of input_ids[0]: tokens of this sequence already in its KV blocks
    block_table: Sequence[int]  # the sequence's KV blocks in order; they cover every position
    #                             < start + len(input_ids) (the step writes input_ids' KV there)
    history: TokenHistory  # the whole sequence so far (prompt + generated), with the
    #                        statistics the processors keep incrementally (the request's own)
    params: SamplingParams  # processors and choice for the next token
    grammar: GrammarState | None = None  # the request's response_format position (its own;
    #                                      the worker advances it by the chosen token)
    images: ImageInputs | None = None  # the request's images (a vision-language model's)

    @property
    def token_ids(self) -> Sequence[int]:
        """The whole sequence so far: prompt, then generated tokens."""
        return self.history.ids

    @property
    def prompt_len(self) -> int:
        return self.history.prompt_len

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the end of the known sequence, so the step chooses
        the sequence's next token (False for a prompt chunk with more to come)."""
        return self.start + len(self.input_ids) == len(self.token_ids)


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Copy the KV of every position of block `src` into block `dst` (copy on write)."""

    src: int
    dst: int


@dataclass(slots=True)
class StepPlan:
    """What the worker does this step."""

    step: int  # step counter, for logs
    decode: list[RowInput] = field(default_factory=list)  # one token each
    prefill: list[RowInput] = field(default_factory=list)  # a chunk each, ≥ 1 token
    copies: list[BlockCopy] = field(default_factory=list)  # applied in order before the forward

    @property
    def rows(self) -> list[RowInput]:
        """Every row: the decode rows, then the prefill rows."""
        return self.decode + self.prefill

    @property
    def sampled_rows(self) -> list[RowInput]:
        """The rows that get a next token; `StepOutput.rows` is aligned with this list."""
        return [r for r in self.rows if r.samples]

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

    rows: list[RowOutput]  # aligned with `StepPlan.sampled_rows`
    forward_seconds: float = 0.0  # seconds spent in the model forward
    process_seconds: float = 0.0  # seconds spent in logits processing and sampling
