"""The scheduler: which requests run each step, and what their tokens mean.

Scheduling model
----------------
Requests wait in a queue ordered by priority (larger first), then arrival.
Each running request holds one KV row from its prefill to its end; running
rows are always rows 0..n-1 (the worker's slot layout).

`schedule()` builds one step:
  1. requests cancelled (by the client, a deadline or shutdown) since the
     last step finish now, and their rows are freed;
  2. freed rows are compacted: the last rows move into the holes, and the
     plan carries those KV moves for the worker to apply first;
  3. every running request decodes one token;
  4. waiting requests are admitted in queue order while a row is free and the
     step's prefill token budget lasts; the first admission of a step ignores
     the budget, so a prompt longer than the budget is never starved. A newly
     admitted request whose prompt begins like a recently cached one gets
     that prefix's KV copied into its row and prefills only the rest
     (`prefix_cache.py`).
`update(plan, output)` appends each row's token, detokenizes, checks the
stopping rules, emits the events, and frees the rows of finished requests in
the same step, so their rows are reused by the next `schedule()`.

There is no preemption: a request keeps its row until it ends.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..worker.plan import RowInput, RowMove, StepOutput, StepPlan
from .events import CANCELLED, DEADLINE_EXCEEDED, Ending, Event, FinishReason
from .prefix_cache import PrefixCache
from .request import Request, RequestStatus
from .row_table import RowTable
from .waiting_queue import WaitingQueue


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_rows: int = 64  # KV rows: the most requests running at once
    max_seq_len: int = 2048  # KV positions per row: prompt + new tokens of one request
    prefill_token_budget: int = 512  # prompt tokens admitted per step (soft, see above)
    prefix_cache_rows: int = 4  # spare KV rows (after max_rows) caching recent prompts; 0 = off
    prefix_min_tokens: int = 8  # shortest shared prefix worth copying


@dataclass(slots=True)
class StepTokens:
    """The tokens one `update` accepted, for metrics."""

    count: int = 0
    inter_token_s: list[float] = field(default_factory=list)  # gaps since each row's last token

    def add(self, req: Request, now: float) -> None:
        self.count += 1
        if req.last_token_at is not None:
            self.inter_token_s.append(now - req.last_token_at)


class Scheduler:
    """The control plane's step logic; single-threaded (the engine's step thread)."""

    def __init__(
        self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self.rows = RowTable(config.max_rows)
        self.waiting = WaitingQueue()
        self.prefix = PrefixCache(
            config.max_rows, config.prefix_cache_rows, config.prefix_min_tokens
        )
        self._by_id: dict[str, Request] = {}
        self._pending_moves: list[RowMove] = []
        self._to_cancel: list[Request] = []  # aborted since the last step
        self._deadlines: list[tuple[float, int, Request]] = []  # heap by deadline
        self._outbox: list[tuple[Request, list[Event]]] = []
        self._step = 0

    # -- state ---------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def has_work(self) -> bool:
        return bool(self._by_id)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    # -- inputs --------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a validated request (one that fits a KV row: validation checks it)."""
        if req.request_id in self._by_id:
            raise ValueError(f"request {req.request_id} is already scheduled")
        if req.max_total_len > self.config.max_seq_len:
            raise ValueError(
                f"request {req.request_id} needs {req.max_total_len} KV positions; "
                f"rows hold {self.config.max_seq_len}"
            )
        self._by_id[req.request_id] = req
        self.waiting.push(req)
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, id(req), req))

    def abort(self, request_id: str, ending: Ending = CANCELLED) -> bool:
        """Ask for a request to end; it finishes at the next `schedule()`. False if unknown."""
        req = self._by_id.get(request_id)
        if req is None or req.cancel_reason is not None:
            return False
        req.cancel_reason = ending
        self._to_cancel.append(req)
        return True

    # -- the step --------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Build the next step's plan (see the module docstring)."""
        now = self.clock()
        self._finish_cancelled(now)
        self._step += 1
        plan = StepPlan(step=self._step, moves=self._pending_moves)
        self._pending_moves = []
        plan.decode = [req.row_input() for req in self.rows]
        budget = self.config.prefill_token_budget
        while self.rows.has_free_row and (req := self.waiting.peek()) is not None:
            hit = self.prefix.match(req.prompt_ids)
            cached = hit[1] if hit else 0
            if plan.prefill and req.prompt_len - cached > budget:
                break
            self.waiting.pop()
            row = self.rows.allocate(req)
            req.admit(row, now, cached)
            if hit:
                self.prefix.use(hit[0])
                plan.moves.append(RowMove(src=hit[0], dst=row, length=cached))
            budget -= req.prompt_len - cached
            plan.prefill.append(req.row_input())
        return plan

    def update(self, plan: StepPlan, output: StepOutput) -> StepTokens:
        """Apply the worker's output to the plan's requests; emit events; free finished rows."""
        now = self.clock()
        freed: list[int] = []
        tokens = StepTokens()
        for row_in, out in zip(plan.rows, output.rows, strict=True):
            req = self._by_id[row_in.key]
            if out.error is not None:
                events: list[Event] = [req.finish(FinishReason.ERROR, now, message=out.error)]
            else:
                tokens.add(req, now)
                events = req.accept(out, now)
            self._outbox.append((req, events))
            if req.is_finished:
                freed.append(row_in.row)
                del self._by_id[req.request_id]
        for row_in in plan.prefill:  # cache the prompts just prefilled, before compaction
            save = self.prefix.save(self._prompt_of(row_in), row_in.row)
            if save is not None:
                self._pending_moves.append(save)
        self._free_rows(freed)
        return tokens

    def fail(self, plan: StepPlan, message: str) -> None:
        """The whole step failed: end every request in it with an error, keep the rest."""
        now = self.clock()
        freed = [r.row for r in plan.rows]
        for row_in in plan.rows:
            req = self._by_id.pop(row_in.key)
            self._outbox.append((req, [req.finish(FinishReason.ERROR, now, message=message)]))
        self._free_rows(freed)

    def abort_all(self, ending: Ending) -> None:
        """Ask every request to end (shutdown)."""
        for request_id in list(self._by_id):
            self.abort(request_id, ending)

    def take_events(self) -> list[tuple[Request, list[Event]]]:
        """Events produced since the last call, grouped per request, in order."""
        events, self._outbox = self._outbox, []
        return events

    # -- helpers ---------------------------------------------------------------
    def _finish_cancelled(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            req = heapq.heappop(self._deadlines)[2]
            if not req.is_finished and req.cancel_reason is None:
                req.cancel_reason = DEADLINE_EXCEEDED
                self._to_cancel.append(req)
        freed: list[int] = []
        for req in self._to_cancel:
            if req.is_finished:  # ended on its own before the abort took effect
                continue
            if req.status is RequestStatus.RUNNING:
                assert req.row is not None
                freed.append(req.row)
            else:
                self.waiting.remove(req)
            ending = req.cancel_reason or CANCELLED
            finish = req.finish(ending.reason, now, message=ending.message, cause=ending.cause)
            self._outbox.append((req, [finish]))
            del self._by_id[req.request_id]
        self._to_cancel = []
        self._free_rows(freed)

    @staticmethod
    def _prompt_of(row_in: RowInput) -> list[int]:
        return list(row_in.token_ids[: row_in.prompt_len])

    def _free_rows(self, rows: Iterable[int]) -> None:
        self._pending_moves.extend(self.rows.free(rows))
