"""The scheduler: which requests run each step, and what their tokens mean.

Scheduling model
----------------
Requests wait in a queue ordered by virtual arrival, `arrival - priority *
priority_step` (earliest first): a larger priority goes first among requests
that arrived close together, and every `priority_step` seconds of waiting
count as one priority step, so no flood of higher-priority requests starves a
lower one for ever (`waiting_queue.py`).
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

Failures end only what they touch: a row whose token cannot be applied (its
detokenizer or stop matcher raises) ends with ERROR and the other rows of the
step go on; a request whose admission raises ends alone; `fail(plan)` ends a
step's rows when the worker (or `update` as a whole) fails, and `fail_all`
ends everything when `schedule()` fails in a way no request explains. Clients
get a generic message with an error id (`internal_error`); the details go to
the log. `check_invariants()` states what must hold between steps.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..api.outcome import FinishReason
from ..worker.plan import RowInput, RowMove, RowOutput, StepOutput, StepPlan
from .engine_config import DEFAULT_PRIORITY_STEP
from .errors import log_internal_error
from .events import CANCELLED, DEADLINE_EXCEEDED, Ending, Event
from .prefix_cache import PrefixCache
from .request import Request, RequestStatus
from .row_table import RowTable
from .waiting_queue import WaitingQueue

log = logging.getLogger("treadle.scheduler")

_STALE_SLACK = 16  # stale deadline-heap entries tolerated beyond twice the live requests


class InvariantError(AssertionError):
    """The scheduler's or engine's bookkeeping is inconsistent (a bug)."""


def internal_error(what: str) -> str:
    """Log the exception being handled under a fresh error id; return the client's
    message (`errors.log_internal_error` on the scheduler's log)."""
    return log_internal_error(log, what)


def require(condition: bool, message: str) -> None:
    """Raise InvariantError with `message` unless `condition` holds."""
    if not condition:
        raise InvariantError(message)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_rows: int = 64  # KV rows: the most requests running at once
    max_seq_len: int = 2048  # KV positions per row: prompt + new tokens of one request
    prefill_token_budget: int = 512  # prompt tokens admitted per step (soft, see above)
    prefix_cache_rows: int = 4  # KV rows after max_batch_rows caching recent prompts; 0 = off
    prefix_min_tokens: int = 8  # shortest shared prefix worth copying
    priority_step: float = DEFAULT_PRIORITY_STEP  # seconds of waiting worth one priority step


@dataclass(slots=True)
class StepTokens:
    """The tokens one `update` accepted, for metrics."""

    count: int = 0
    inter_token_seconds: list[float] = field(default_factory=list)  # per row, since its last

    def add(self, req: Request, now: float) -> None:
        self.count += 1
        if req.last_token_at is not None:
            self.inter_token_seconds.append(now - req.last_token_at)


class Scheduler:
    """The control plane's step logic; single-threaded (the engine's step thread)."""

    def __init__(
        self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self.rows = RowTable(config.max_batch_rows)
        self.waiting = WaitingQueue(self.config.priority_step)
        self.prefix = PrefixCache(
            config.max_batch_rows, config.prefix_cache_rows, config.prefix_min_tokens
        )
        self._by_id: dict[str, Request] = {}  # every waiting and running request
        self._pending_moves: list[RowMove] = []
        self._to_cancel: dict[str, Request] = {}  # running requests aborted since the last step
        self._deadlines: list[tuple[float, int, Request]] = []  # heap; finished ones pruned lazily
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

    @property
    def has_events(self) -> bool:
        """Events wait for `take_events` (e.g. a waiting request was just cancelled)."""
        return bool(self._outbox)

    @property
    def steps(self) -> int:
        """Steps scheduled so far (the last plan's `step`)."""
        return self._step

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def requests(self) -> list[Request]:
        """Every request not finished yet: waiting and running."""
        return list(self._by_id.values())

    # -- inputs --------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a validated request (one that fits a KV row: validation checks it)."""
        if req.request_id in self._by_id:
            raise ValueError(f"request {req.request_id} is already scheduled")
        if req.max_total_tokens > self.config.max_seq_len:
            raise ValueError(
                f"request {req.request_id} needs {req.max_total_tokens} KV positions; "
                f"rows hold {self.config.max_seq_len}"
            )
        self._by_id[req.request_id] = req
        self.waiting.push(req)
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, id(req), req))

    def abort(self, request_id: str, ending: Ending = CANCELLED) -> bool:
        """Ask for a request to end. False if unknown or already asked.

        A waiting request ends at once (its event waits in `take_events`); a
        running one at the next `schedule()`, which frees its row.
        """
        req = self._by_id.get(request_id)
        if req is None or req.cancel_reason is not None:
            return False
        self._cancel(req, ending, self.clock())
        return True

    def abort_all(self, ending: Ending) -> None:
        """Ask every request to end (shutdown)."""
        for request_id in list(self._by_id):
            self.abort(request_id, ending)

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
            try:
                cost = self._admit(req, plan, budget, now)
            except Exception:
                self._reject(req, plan, now, internal_error(f"admitting {req.request_id} failed"))
                continue
            if cost is None:
                break
            budget -= cost
        return plan

    def update(self, plan: StepPlan, output: StepOutput) -> StepTokens:
        """Apply the worker's output to the plan's requests; emit events; free finished rows.

        One row failing (its token cannot be applied) ends that request with
        ERROR; the other rows' tokens are applied as usual.
        """
        now = self.clock()
        freed: list[int] = []
        tokens = StepTokens()
        for row_in, out in zip(plan.rows, output.rows, strict=True):
            req = self._by_id[row_in.request_id]
            events = self._apply(req, out, now, tokens)
            if req.is_finished:
                freed.append(row_in.row)
                self._retire(req, events)
            else:
                self._outbox.append((req, events))
        self._cache_prompts(plan.prefill)
        self._free_rows(freed)
        return tokens

    def fail(self, plan: StepPlan, message: str) -> None:
        """The step failed as a whole: end its requests with an error; the waiting ones go on.

        Every running request is in its step's plan, so no row stays held. The
        prefix cache is emptied too: the step's KV copies may not have happened.
        """
        now = self.clock()
        for row_in in plan.rows:
            req = self._by_id.get(row_in.request_id)
            if req is not None and req.status is RequestStatus.RUNNING:
                self._retire(req, [req.finish(FinishReason.ERROR, now, message=message)])
        for req in list(self.rows):  # none left unless the plan was not this step's
            if not req.is_finished:
                self._retire(req, [req.finish(FinishReason.ERROR, now, message=message)])
        self.rows = RowTable(self.config.max_batch_rows)
        self._pending_moves = []
        self.prefix.clear()

    def fail_all(self, message: str) -> None:
        """End every request (waiting and running) with an error and reset the bookkeeping.

        For a failure no request explains (e.g. inside `schedule()`): afterwards
        nothing is held and the scheduler is ready for new requests.
        """
        now = self.clock()
        for req in [*self._by_id.values(), *self.rows]:
            if not req.is_finished:
                self._retire(req, [req.finish(FinishReason.ERROR, now, message=message)])
        self._by_id.clear()
        self.rows = RowTable(self.config.max_batch_rows)
        self.waiting = WaitingQueue(self.config.priority_step)
        self._to_cancel.clear()
        self._deadlines.clear()
        self._pending_moves = []
        self.prefix.clear()

    def take_events(self) -> list[tuple[Request, list[Event]]]:
        """Events produced since the last call, grouped per request, in order."""
        events, self._outbox = self._outbox, []
        return events

    def check_invariants(self) -> None:
        """Raise InvariantError unless the bookkeeping is consistent (for tests and debugging).

        Rows 0..n-1 hold the running requests, each knowing its row; the id
        registry is exactly the waiting plus the running requests; nothing
        finished is held (the deadline heap keeps a bounded number of stale
        entries, pruned lazily); pending cancellations are of held requests.
        """
        running = list(self.rows)
        require(len(running) <= self.rows.capacity, "more running requests than rows")
        for i, req in enumerate(running):
            require(
                req.status is RequestStatus.RUNNING and req.row == i,
                f"row {i} holds {req.request_id} ({req.status.value}, row {req.row})",
            )
        waiting = list(self.waiting)
        for req in waiting:
            require(req.status is RequestStatus.WAITING, f"{req.request_id} queued but not waiting")
        held = {id(r) for r in running} | {id(r) for r in waiting}
        require(len(held) == len(running) + len(waiting), "a request both waits and runs")
        by_id = {id(r) for r in self._by_id.values()}
        require(held == by_id, "the id registry is not the waiting plus the running requests")
        for rid, req in self._by_id.items():
            require(req.request_id == rid, f"{req.request_id} registered as {rid}")
        for req in self._to_cancel.values():
            require(id(req) in by_id, f"cancelling {req.request_id}, which is not held")
        require(
            len(self._deadlines) <= 2 * len(self._by_id) + _STALE_SLACK,
            f"the deadline heap holds {len(self._deadlines)} entries for {len(self._by_id)}",
        )
        require(self.waiting.is_pruned, "the waiting queue holds too many removed entries")

    # -- helpers ---------------------------------------------------------------
    def _admit(self, req: Request, plan: StepPlan, budget: int, now: float) -> int | None:
        """Admit the queue's head into the plan; return its prompt cost (None: over budget)."""
        hit = self.prefix.match(req.prompt_ids)
        cached = hit[1] if hit else 0
        cost = req.prompt_len - cached
        if plan.prefill and cost > budget:
            return None
        self.waiting.pop()
        row = self.rows.allocate(req)
        req.admit(row, now, cached)
        if hit:
            self.prefix.use(hit[0])
            plan.moves.append(RowMove(src=hit[0], dst=row, length=cached))
        plan.prefill.append(req.row_input())
        return cost

    def _reject(self, req: Request, plan: StepPlan, now: float, message: str) -> None:
        """Undo a failed admission of `req` and end it with `message`."""
        self.waiting.remove(req)
        if self.rows.release_last(req):  # it took the last row: freeing it moves nothing
            row = len(self.rows)
            plan.moves = [m for m in plan.moves if m.dst != row]
            plan.prefill = [r for r in plan.prefill if r.request_id != req.request_id]
        self._retire(req, [req.finish(FinishReason.ERROR, now, message=message)])

    def _apply(self, req: Request, out: RowOutput, now: float, tokens: StepTokens) -> list[Event]:
        """One row's output as events; a row that cannot be applied ends with ERROR alone."""
        if out.error is not None:
            return [req.finish(FinishReason.ERROR, now, message=out.error)]
        tokens.add(req, now)
        try:
            return req.accept(out, now)
        except Exception:
            message = internal_error(f"applying a token to {req.request_id} failed")
            return [req.finish(FinishReason.ERROR, now, message=message)]

    def _cache_prompts(self, prefilled: list[RowInput]) -> None:
        """Cache the prompts just prefilled, before compaction (a failure only costs the cache)."""
        try:
            for row_in in prefilled:
                save = self.prefix.save(self._prompt_of(row_in), row_in.row)
                if save is not None:
                    self._pending_moves.append(save)
        except Exception:
            internal_error("caching prompts failed; the prefix cache is emptied")
            self.prefix.clear()

    def _cancel(self, req: Request, ending: Ending, now: float) -> None:
        req.cancel_reason = ending
        if req.status is RequestStatus.WAITING:  # holds no row: it leaves the queue now
            self.waiting.remove(req)
            self._end(req, ending, now)
        else:
            self._to_cancel[req.request_id] = req

    def _finish_cancelled(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            req = heapq.heappop(self._deadlines)[2]
            if not req.is_finished and req.cancel_reason is None:
                self._cancel(req, DEADLINE_EXCEEDED, now)
        freed: list[int] = []
        for req in list(self._to_cancel.values()):  # running: waiting ones ended in `_cancel`
            if req.row is not None:
                freed.append(req.row)
            self._end(req, req.cancel_reason or CANCELLED, now)
        self._to_cancel.clear()
        self._free_rows(freed)

    def _end(self, req: Request, ending: Ending, now: float) -> None:
        finish = req.finish(ending.reason, now, message=ending.message, cause=ending.cause)
        self._retire(req, [finish])

    def _retire(self, req: Request, events: list[Event]) -> None:
        """`req` has finished: queue its last events and forget it everywhere but its row."""
        self._outbox.append((req, events))
        if self._by_id.get(req.request_id) is req:
            del self._by_id[req.request_id]
        if self._to_cancel.get(req.request_id) is req:
            del self._to_cancel[req.request_id]
        self._prune_deadlines()

    def _prune_deadlines(self) -> None:
        """Drop finished requests from the deadline heap (amortised O(1) per request)."""
        if not self._by_id:
            self._deadlines.clear()
        elif len(self._deadlines) > 2 * len(self._by_id) + _STALE_SLACK:
            self._deadlines = [e for e in self._deadlines if not e[2].is_finished]
            heapq.heapify(self._deadlines)

    @staticmethod
    def _prompt_of(row_in: RowInput) -> list[int]:
        return list(row_in.token_ids[: row_in.prompt_len])

    def _free_rows(self, rows: Iterable[int]) -> None:
        self._pending_moves.extend(self.rows.free(rows))
