"""The scheduler's request: one object that owns all of a request's state."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..api.outcome import FinishReason, Usage
from ..api.tools import ToolCall
from ..worker.grammar import GrammarState
from ..worker.history import TokenHistory
from ..worker.params import SamplingParams
from ..worker.plan import RowInput, RowOutput
from ..worker.vision import ImageInputs
from .block_pool import BlockHash
from .detokenizer import IncrementalDetokenizer
from .events import Cause, Ending, Event, FinishEvent, TokenEvent
from .stop_sequences import StopSequenceMatcher
from .stop_strings import StopStringMatcher
from .tool_splitter import ToolCallSplitter

EventSink = Callable[[list[Event]], None]  # receives a request's events of one step, in order


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted), or held by its leader; holds no KV block
    RUNNING = "running"  # holds KV blocks; prefilling in chunks or decoding
    FINISHED = "finished"  # terminal event emitted; holds nothing


@dataclass(frozen=True, slots=True)
class StoppingParams:
    """When a request ends (besides cancellation), checked in this order each step."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()  # empty when the request ignores EOS
    stop_token_ids: tuple[int, ...] = ()
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    include_stop_in_output: bool = False
    max_time: float | None = None  # seconds since admission


@dataclass(eq=False)
class Request:
    """A request (one sample of it, when it asks for several) from arrival to its
    terminal event.

    Everything about it lives here: ids, counters, parameters, stopping and
    detokenizer state, timings and where its events go. Phase and budget are
    derived from the counters, not stored.

    Samples: a request asking for n samples is n `Request`s with the same
    `request_id` and `index` 0..n-1. Sample 0, the leader, is the only one
    queued; it holds the others (`followers`) and computes the prompt but its
    last token alone. The scheduler then forks them (`fork_from`): they share
    the leader's full prompt blocks, get a copy of its partial last block,
    and run on their own from there, each with its own history and seed.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    detokenizer: IncrementalDetokenizer
    sink: EventSink
    priority: int = 0
    deadline: float | None = None  # monotonic time after which the request is cancelled
    arrival: float = field(default_factory=time.monotonic)
    index: int = 0  # which sample of the request (0..n-1)
    followers: list[Request] = field(default_factory=list)  # samples 1..n-1 until the fork
    grammar: GrammarState | None = None  # response_format's state (this sample's own)
    calls: ToolCallSplitter | None = None  # with tools: separates calls from content
    images: ImageInputs | None = None  # its images' tensors and features (shared by samples)

    history: TokenHistory = field(init=False)  # prompt + generated, with running statistics
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    blocks: list[int] = field(default_factory=list, init=False)  # KV block table while running
    num_computed: int = field(default=0, init=False)  # leading token_ids whose KV is in blocks
    block_hashes: list[BlockHash] = field(default_factory=list, init=False)  # of full blocks
    num_preemptions: int = field(default=0, init=False)
    admitted_at: float | None = field(default=None, init=False)  # first admission
    cached_len: int = field(default=0, init=False)  # prompt tokens found in the prefix cache
    first_token_at: float | None = field(default=None, init=False)
    last_token_at: float | None = field(default=None, init=False)
    cancel_reason: Ending | None = field(default=None, init=False)
    matcher: StopStringMatcher = field(init=False)
    sequence_matcher: StopSequenceMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.history = TokenHistory(self.prompt_ids)
        self.matcher = StopStringMatcher(
            self.stopping.stop_strings, self.stopping.include_stop_in_output
        )
        self.sequence_matcher = StopSequenceMatcher(
            self.stopping.stop_token_sequences, self.stopping.include_stop_in_output
        )

    # -- derived state -------------------------------------------------------
    @property
    def token_ids(self) -> list[int]:
        """Prompt, then generated tokens (the history's list: append through `accept`)."""
        return self.history.ids

    def content_ids(self, start: int, end: int) -> list[int]:
        """`token_ids[start:end]` as the prefix cache keys them: each image token stands
        for its image (a negative id from the image's hash), so blocks holding two
        different pictures never match and the same picture does."""
        ids = self.token_ids[start:end]
        if self.images is None:
            return ids
        lo, hi = self.images.rows(start, end)
        for position, key in zip(
            self.images.positions[lo:hi], self.images.keys[lo:hi], strict=True
        ):
            ids[position - start] = key
        return ids

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to feed before the next token can be chosen (≥ 1 while it runs)."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Everything but the last token is in the KV blocks: the next step feeds one token."""
        return self.num_computed > 0 and self.num_uncomputed == 1

    @property
    def max_total_tokens(self) -> int:
        """The most KV positions this request can ever need."""
        return self.prompt_len + self.stopping.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def key(self) -> tuple[str, int]:
        """What tells samples of one request apart: (request id, sample index)."""
        return self.request_id, self.index

    @property
    def fork_at(self) -> int | None:
        """Computed tokens at which the held followers fork (all but the prompt's last
        token); None when it holds none."""
        return self.prompt_len - 1 if self.followers else None

    def row_input(self, num_tokens: int) -> RowInput:
        """How the worker sees this request this step: its next `num_tokens` tokens
        (the block table is the request's own list: valid for this step)."""
        start = self.num_computed
        return RowInput(
            request_id=self.request_id,
            sample=self.index,
            input_ids=self.token_ids[start : start + num_tokens],
            start=start,
            block_table=self.blocks,
            history=self.history,
            params=self.sampling,
            grammar=self.grammar,
            images=self.images,
        )

    # -- transitions ---------------------------------------------------------
    def admit(self, now: float, blocks: list[int], computed: int) -> None:
        """Start running with `blocks` holding the KV of its first `computed` tokens, found
        in the prefix cache."""
        self.status = RequestStatus.RUNNING
        self.blocks = list(blocks)
        self.num_computed = computed
        if self.admitted_at is None:  # first admission (not a resumption)
            self.admitted_at = now
            self.cached_len = min(self.num_computed, self.prompt_len)

    def fork_from(self, leader: Request, blocks: list[int]) -> None:
        """Start running as a sample forked from `leader` at its fork point, with
        `blocks` holding the same KV as the leader's computed tokens."""
        self.status = RequestStatus.RUNNING
        self.blocks = blocks
        self.num_computed = leader.num_computed
        self.block_hashes = list(leader.block_hashes)
        self.admitted_at = leader.admitted_at
        self.cached_len = leader.cached_len

    def preempt(self) -> list[int]:
        """Back to waiting, its KV dropped (it is recomputed on resumption, generated tokens
        included); returns the blocks it held, for the caller to free."""
        blocks, self.blocks = self.blocks, []
        self.status = RequestStatus.WAITING
        self.num_computed = 0
        self.num_preemptions += 1
        return blocks

    def accept(self, out: RowOutput, now: float) -> list[Event]:
        """Apply one generated token; return its events (a FinishEvent last if it ended)."""
        token = out.token_id
        self.history.append(token)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        reason = self._token_stop_reason(token)
        drop_text = reason in (FinishReason.EOS, FinishReason.STOP_TOKEN) and not (
            self.stopping.include_stop_in_output
        )
        delta, ended = self.sequence_matcher.feed(
            token, "" if drop_text else self.detokenizer.step(token)
        )
        if reason is None and ended:
            reason = FinishReason.STOP_TOKEN
        late = self._late_stop_reason(out, now) if reason is None else None
        if (reason or late) is not None and not ended:
            delta += self.sequence_matcher.flush()
        text, matched = self.matcher.feed(delta)
        if reason is None and matched is not None:
            reason = FinishReason.STOP_SEQUENCE
        reason = reason or late
        if reason is not None and matched is None:
            text += self.matcher.flush()
        tool_calls: tuple[ToolCall, ...] = ()
        if self.calls is not None:
            text = self.calls.feed(text)
            if reason is not None:
                rest, tool_calls = self.calls.finish()
                text += rest
        logprobs = (out.logprobs,) if out.logprobs is not None else ()
        events: list[Event] = [TokenEvent(self.request_id, (token,), text, logprobs, self.index)]
        if reason is not None:
            events.append(self.finish(reason, now, stop_sequence=matched, tool_calls=tool_calls))
        return events

    def finish(
        self,
        reason: FinishReason,
        now: float,
        stop_sequence: str | None = None,
        message: str | None = None,
        cause: Cause | None = None,
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> FinishEvent:
        """Mark the request finished and build its terminal event."""
        self.status = RequestStatus.FINISHED
        return FinishEvent(
            request_id=self.request_id,
            index=self.index,
            reason=reason,
            usage=self.usage(now),
            stop_sequence=stop_sequence,
            message=message,
            cause=cause,
            tool_calls=tool_calls,
        )

    def usage(self, now: float) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_len,
            cached_prompt_tokens=self.cached_len,
            generated_tokens=self.num_generated,
            queue_seconds=(self.admitted_at - self.arrival)
            if self.admitted_at is not None
            else 0.0,
            time_to_first_token_seconds=(
                self.first_token_at - self.arrival if self.first_token_at is not None else None
            ),
            total_seconds=now - self.arrival,
        )

    # -- stopping rules, in DESIGN order ---------------------------------------
    def _token_stop_reason(self, token: int) -> FinishReason | None:
        if self.num_generated >= self.stopping.max_new_tokens:
            return FinishReason.LENGTH
        if token in self.stopping.eos_token_ids:
            return FinishReason.EOS
        if token in self.stopping.stop_token_ids:
            return FinishReason.STOP_TOKEN
        return None

    def _late_stop_reason(self, out: RowOutput, now: float) -> FinishReason | None:
        max_time = self.stopping.max_time
        if (
            max_time is not None
            and self.admitted_at is not None
            and now - self.admitted_at >= max_time
        ):
            return FinishReason.TIME_LIMIT
        if out.stop:
            return FinishReason.STOP_CRITERION
        return None
