"""The scheduler: which requests run each step, and what their tokens mean.

Scheduling model (vLLM v1's, with treadle's priorities)
--------------------------------------------------------
Requests wait in a queue ordered by virtual arrival, `arrival - priority *
priority_step` (earliest first): a larger priority goes first among requests
that arrived close together, and every `priority_step` seconds of waiting
count as one priority step, so no flood of higher-priority requests starves a
lower one for ever (`waiting_queue.py`). The same order ranks the running
requests: the last in it is the first preempted.

KV memory is a pool of fixed-size blocks (`block_pool.py`); a running
request holds a block table covering the tokens computed so far, and takes
blocks as its tokens arrive. Each step has a token budget; a prompt chunk
costs its tokens plus their attention to the positions before them
(`step_budget.py`), so a long prompt's later chunks are shorter.

`schedule()` builds one step:
  1. requests cancelled (by the client, a deadline or shutdown) since the
     last step finish now, and their blocks are freed;
  2. every running request that decodes feeds its one token (decodes come
     first and are never cut by the budget);
  3. running requests still prefilling get chunks of their prompt from what
     is left of the budget, in rank order;
  4. waiting requests are admitted in queue order while a row
     (`max_batch_rows`) and budget remain. An admitted request first takes
     every cached full block of its prompt (prefix cache), then a copy of the
     cached block that continues its prompt furthest (a hit ending
     mid-block), and computes only the rest, in chunks. A request with a
     higher priority than the last running one preempts it when rows or
     blocks are short.
  A request asking for n samples is admitted as its sample 0 (the leader)
  with rows for all n. The leader computes the prompt but its last token;
  then its other samples fork from it: they share its full blocks (reference
  counts), each gets a copy of its partial last block (`BlockCopy`, copy on
  write), and all n feed the last prompt token as their own rows, so each
  chooses its first token with its own seed. From there on every sample is
  a request of its own (preempted, finished, cancelled alone; an abort by id
  ends them all).
  If a row cannot get the block its tokens need, the lowest-ranked running
  request is preempted: its blocks are freed and it goes back to the
  waiting queue with its generated tokens, to be recomputed (prompt +
  generated) when it is admitted again. Its client sees only latency.
  Each step moves at least one chunk forward (the first chunk of a step may
  exceed the budget by up to a block), so no prompt starves behind decodes.
`update(plan, output)` marks the fed tokens computed, registers the full
blocks they completed in the prefix cache, appends each sampling row's token,
detokenizes, checks the stopping rules, emits the events, and frees the
blocks of finished requests in the same step.

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
from collections.abc import Callable
from dataclasses import dataclass, field

from ..api.outcome import FinishReason
from ..worker.plan import BlockCopy, RowInput, RowOutput, StepOutput, StepPlan
from .block_pool import BlockPool, chain_hashes
from .engine_config import DEFAULT_PRIORITY_STEP
from .errors import log_internal_error
from .events import CANCELLED, DEADLINE_EXCEEDED, Ending, Event, FinishEvent
from .request import Request, RequestStatus
from .step_budget import chunk_cost, chunk_fit
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
    num_blocks: int = 1024  # KV blocks in the pool (the worker's)
    block_size: int = 16  # KV positions per block (the worker's)
    max_batch_rows: int = 64  # the most requests running at once
    max_seq_len: int = 2048  # positions one request may hold: prompt + new tokens
    step_token_budget: int = 256  # tokens fed per step: decodes first, then prompt chunks
    attention_span: int | None = None  # prompt chunks cost their attention too (step_budget.py)
    prefix_cache: bool = True  # reuse cached full blocks of earlier prompts
    priority_step: float = DEFAULT_PRIORITY_STEP  # seconds of waiting worth one priority step

    @property
    def pool_tokens(self) -> int:
        return self.num_blocks * self.block_size


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
        self.pool = BlockPool(config.num_blocks, config.block_size, config.prefix_cache)
        self.waiting = WaitingQueue(self.config.priority_step)
        self.running: list[Request] = []  # in rank order after each `schedule()`
        # every waiting and running request, by id, then sample index (held followers are
        # their leader's)
        self._by_id: dict[str, dict[int, Request]] = {}
        self._to_cancel: dict[tuple[str, int], Request] = {}  # running, aborted since the step
        self._deadlines: list[tuple[float, int, Request]] = []  # heap; finished ones pruned lazily
        self._outbox: list[tuple[Request, list[Event]]] = []
        self._step = 0
        self.preempted = 0  # preemptions during the last `schedule()`

    # -- state ---------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

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

    def get(self, request_id: str, index: int = 0) -> Request | None:
        """Sample `index` of a waiting or running request (not a held follower)."""
        return self._by_id.get(request_id, {}).get(index)

    def requests(self) -> list[Request]:
        """Every request (sample) not finished yet: waiting and running."""
        return [r for samples in self._by_id.values() for r in samples.values()]

    def _of(self, row: RowInput) -> Request:
        return self._by_id[row.request_id][row.sample]

    # -- inputs --------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a validated request (one the pool can hold: validation checks it), with
        the samples it holds as followers."""
        if req.request_id in self._by_id:
            raise ValueError(f"request {req.request_id} is already scheduled")
        most = min(self.config.max_seq_len, self.config.pool_tokens)
        if req.max_total_tokens > most:
            raise ValueError(
                f"request {req.request_id} needs {req.max_total_tokens} KV positions; "
                f"at most {most} fit"
            )
        self._by_id[req.request_id] = {req.index: req}
        self.waiting.push(req)
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, id(req), req))

    def abort(self, request_id: str, ending: Ending = CANCELLED) -> bool:
        """Ask for a request to end. False if unknown or already asked.

        A waiting request ends at once (its event waits in `take_events`); a
        running one at the next `schedule()`, which frees its blocks. Every
        sample of the request ends.
        """
        samples = [r for r in self._by_id.get(request_id, {}).values() if r.cancel_reason is None]
        now = self.clock()
        for req in samples:
            self._cancel(req, ending, now)
        return bool(samples)

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
        self.preempted = 0
        plan = StepPlan(step=self._step)
        self.running.sort(key=self.waiting.key)
        for req in [r for r in self.running if r.is_decoding]:
            if req.status is RequestStatus.RUNNING:  # not preempted meanwhile
                self._run(req, 1, plan)
        budget: float = self.config.step_token_budget - len(plan.decode)
        for req in [r for r in self.running if not r.is_decoding]:
            if req.status is RequestStatus.RUNNING:
                start = req.num_computed
                n = self._chunk(start, req.num_uncomputed, budget, plan)
                budget -= chunk_cost(start, self._run(req, n, plan), self.config.attention_span)
        while (head := self.waiting.peek()) is not None:
            try:
                cost = self._admit(head, budget, plan, now)
            except Exception:
                self._reject(head, plan, now, internal_error(f"admitting {head.request_id} failed"))
                continue
            if cost is None:
                break
            budget -= cost
        return plan

    def update(self, plan: StepPlan, output: StepOutput) -> StepTokens:
        """Apply the worker's output to the plan's requests; emit events; free finished ones.

        One row failing (its token cannot be applied) ends that request with
        ERROR; the other rows' tokens are applied as usual.
        """
        now = self.clock()
        for row_in in plan.rows:
            self._computed(self._of(row_in), len(row_in.input_ids))
        tokens = StepTokens()
        for row_in, out in zip(plan.sampled_rows, output.rows, strict=True):
            req = self._of(row_in)
            events = self._apply(req, out, now, tokens)
            if req.is_finished:
                self._retire(req, events)
            else:
                self._outbox.append((req, events))
        return tokens

    def fail(self, plan: StepPlan, message: str) -> None:
        """The step failed as a whole: end its requests with an error; the others go on.

        The prefix cache is emptied too: the step's KV writes may not have happened.
        """
        now = self.clock()
        for row_in in plan.rows:
            req = self.get(row_in.request_id, row_in.sample)
            if req is not None and req.status is RequestStatus.RUNNING:
                self._retire(req, [req.finish(FinishReason.ERROR, now, message=message)])
        self.pool.clear_cache()

    def fail_all(self, message: str) -> None:
        """End every request (waiting and running) with an error and reset the bookkeeping.

        For a failure no request explains (e.g. inside `schedule()`): afterwards
        nothing is held and the scheduler is ready for new requests.
        """
        now = self.clock()
        for req in [*self.requests(), *self.running]:
            if not req.is_finished:
                req.blocks = []  # the pool is replaced below
                self._retire(req, [req.finish(FinishReason.ERROR, now, message=message)])
        self._by_id.clear()
        self.running = []
        self.waiting = WaitingQueue(self.config.priority_step)
        self.pool = BlockPool(
            self.config.num_blocks, self.config.block_size, self.pool.cache_prefixes
        )
        self._to_cancel.clear()
        self._deadlines.clear()

    def take_events(self) -> list[tuple[Request, list[Event]]]:
        """Events produced since the last call, grouped per request, in order."""
        events, self._outbox = self._outbox, []
        return events

    def check_invariants(self) -> None:
        """Raise InvariantError unless the bookkeeping is consistent (for tests and debugging).

        Every block is either free or held, and held exactly as often as block
        tables of running requests name it; a running request's table covers
        its computed tokens; waiting requests hold nothing; the id registry is
        exactly the waiting plus the running requests; nothing finished is held
        (the deadline heap keeps a bounded number of stale entries, pruned
        lazily); pending cancellations are of held requests.
        """
        running = list(self.running)
        require(self._rows_taken() <= self.config.max_batch_rows, "more rows taken than there are")
        holders = [0] * self.pool.num_blocks
        for req in running:
            require(req.status is RequestStatus.RUNNING, f"{req.request_id} runs as {req.status}")
            need = -(-req.num_computed // self.config.block_size)
            require(len(req.blocks) >= need, f"{req.request_id}'s blocks miss computed tokens")
            require(
                len(set(req.blocks)) == len(req.blocks), f"{req.request_id} holds a block twice"
            )
            for block in req.blocks:
                holders[block] += 1
        for block, count in enumerate(holders):
            require(
                self.pool.ref_count[block] == count,
                f"block {block}: {count} holders, reference count {self.pool.ref_count[block]}",
            )
            require(self.pool.is_free(block) == (count == 0), f"block {block}: free and held")
        waiting = list(self.waiting)
        for req in waiting:
            require(req.status is RequestStatus.WAITING, f"{req.request_id} queued but not waiting")
            require(not req.blocks and req.num_computed == 0, f"{req.request_id} waits with KV")
        held = {id(r) for r in running} | {id(r) for r in waiting}
        require(len(held) == len(running) + len(waiting), "a request both waits and runs")
        by_id = {id(r) for r in self.requests()}
        require(held == by_id, "the id registry is not the waiting plus the running requests")
        for rid, samples in self._by_id.items():
            for index, req in samples.items():
                require(req.key == (rid, index), f"{req.key} registered as {(rid, index)}")
                for f in req.followers:
                    require(
                        f.status is RequestStatus.WAITING and not f.blocks and f.request_id == rid,
                        f"{f.key}, held by its leader, is not a pristine sample of {rid}",
                    )
                fork_at = req.fork_at
                require(
                    fork_at is None or req.num_computed <= fork_at,
                    f"{req.key} computed past its fork point",
                )
        for req in self._to_cancel.values():
            require(id(req) in by_id, f"cancelling {req.request_id}, which is not held")
        require(
            len(self._deadlines) <= 2 * len(by_id) + _STALE_SLACK,
            f"the deadline heap holds {len(self._deadlines)} entries for {len(by_id)}",
        )
        require(self.waiting.is_pruned, "the waiting queue holds too many removed entries")

    # -- helpers: blocks and chunks ---------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _fits(self, req: Request, free: int) -> int:
        """How many more tokens `req`'s blocks plus `free` new blocks can hold."""
        room = (len(req.blocks) + free) * self.config.block_size
        return max(0, room - req.num_computed)

    def _chunk(self, start: int, left: int, budget: float, plan: StepPlan) -> int:
        """Tokens a prompt computed up to `start`, with `left` to feed, may feed this step
        from `budget` (`step_budget.py`): at least a block's worth (or what it has left)
        when the step has no chunk yet, so prompts always advance."""
        n = chunk_fit(start, budget, self.config.attention_span)
        if not plan.prefill:
            n = max(n, self.config.block_size)
        return max(0, min(left, n))

    def _run(self, req: Request, n: int, plan: StepPlan) -> int:
        """Put `n` tokens of running `req` in the plan, taking the blocks they need; when
        none is free, preempt from the bottom of the ranking (possibly `req` itself).
        Returns the tokens planned (fewer than `n` if the free blocks hold fewer)."""
        if n <= 0:
            return 0
        fork_at = req.fork_at
        if fork_at is not None:
            if req.num_computed < fork_at:
                n = min(n, fork_at - req.num_computed)
            elif not self._fork(req, plan) or req.status is not RequestStatus.RUNNING:
                return 0
        while (fit := min(n, self._fits(req, self.pool.num_free))) == 0:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is req:
                return 0
        extra = self._blocks_for(req.num_computed + fit) - len(req.blocks)
        req.blocks.extend(self.pool.allocate(max(0, extra)))
        row = req.row_input(fit)
        (plan.decode if req.is_decoding else plan.prefill).append(row)
        return fit

    def _fork(self, req: Request, plan: StepPlan) -> bool:
        """Start `req`'s held samples at its fork point: each shares its full blocks and
        gets a copy of its partial last block (preempting from the bottom of the ranking
        for those copies), then feeds its last prompt token this step. False if `req`
        itself was preempted (it forks when it comes back)."""
        full, partial = divmod(req.num_computed, self.config.block_size)
        while partial and self.pool.num_free < len(req.followers):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is req:
                return False
        shared = req.blocks[:full]
        followers, req.followers = req.followers, []
        for f in followers:
            self.pool.touch(shared)
            blocks = list(shared)
            if partial:
                blocks += self.pool.allocate(1)
                plan.copies.append(BlockCopy(src=req.blocks[full], dst=blocks[-1]))
            f.fork_from(req, blocks)
            self.running.append(f)
            self._by_id[f.request_id][f.index] = f
            if f.deadline is not None:
                heapq.heappush(self._deadlines, (f.deadline, id(f), f))
        for f in followers:
            if f.status is RequestStatus.RUNNING:  # not preempted by a sibling's block
                self._run(f, f.num_uncomputed, plan)
        return True

    def _rows_taken(self) -> int:
        """Rows of running requests, and those reserved for the samples they hold."""
        return len(self.running) + sum(len(r.followers) for r in self.running)

    def _admit(self, req: Request, budget: float, plan: StepPlan, now: float) -> float | None:
        """Admit the queue's head with a chunk from `budget`; return the budget its chunk
        costs (None: it waits, for want of budget, rows or blocks)."""
        if self._chunk(0, 1, budget, plan) <= 0:
            return None
        if self._rows_taken() + 1 + len(req.followers) > self.config.max_batch_rows:
            return 0 if self._preempt_for(req, plan) else None
        bs = self.config.block_size
        cached = self._cached_blocks(req)
        partial = self._partial_hit(req, len(cached))  # (cached block, tokens it gives)
        hit = len(cached) * bs + (partial[1] if partial else 0)
        n = self._chunk(hit, len(req.token_ids) - hit, budget, plan)
        if n <= 0:  # the budget left holds no token this far into the prompt
            return None
        reusable_free = sum(1 for b in cached if self.pool.is_free(b))
        free = self.pool.num_free - reusable_free
        fit = min(n, free * bs - hit % bs)
        if fit <= 0:
            return 0 if self._preempt_for(req, plan) else None
        self.waiting.pop()
        self.pool.touch(cached)
        blocks = list(cached)
        if partial:  # copy on write: the block's first tokens are ours, the rest we write
            blocks += self.pool.allocate(1)
            plan.copies.append(BlockCopy(src=partial[0], dst=blocks[-1]))
        req.admit(now, blocks, hit)
        self.running.append(req)
        return chunk_cost(hit, self._run(req, fit, plan), self.config.attention_span)

    def _partial_hit(self, req: Request, full: int) -> tuple[int, int] | None:
        """A cached block whose first tokens continue `req`'s `full` cached blocks, and how
        many of them `req` can take (always leaving a token to feed); None if none."""
        bs = self.config.block_size
        start = full * bs
        tokens = req.content_ids(start, min(start + bs - 1, len(req.token_ids) - 1))
        parent = req.block_hashes[full - 1] if full else None
        return self.pool.partial_match(parent, tokens)

    def _cached_blocks(self, req: Request) -> list[int]:
        """The cached blocks `req` can start from: full blocks of its known tokens, always
        leaving at least one token to feed (its logits give the next token)."""
        usable = (len(req.token_ids) - 1) // self.config.block_size
        if usable == 0 or not self.pool.cache_prefixes:
            return []
        self._hash_blocks(req, usable)
        return self.pool.cached_prefix(req.block_hashes[:usable])

    def _hash_blocks(self, req: Request, full: int) -> None:
        """Extend `req.block_hashes` to its first `full` full blocks."""
        have = len(req.block_hashes)
        if have < full:
            parent = req.block_hashes[-1] if have else None
            tokens = req.content_ids(0, full * self.config.block_size)
            req.block_hashes.extend(chain_hashes(tokens, self.config.block_size, have, parent))

    def _computed(self, req: Request, n: int) -> None:
        """`n` more tokens of `req` are in its blocks: register the blocks they filled."""
        first = req.num_computed // self.config.block_size
        req.num_computed += n
        full = req.num_computed // self.config.block_size
        if self.pool.cache_prefixes and full > first:
            self._hash_blocks(req, full)
            bs = self.config.block_size
            for i in range(first, full):
                parent = req.block_hashes[i - 1] if i else None
                tokens = req.content_ids(i * bs, (i + 1) * bs)
                self.pool.register(req.blocks[i], req.block_hashes[i], parent, tokens)

    def _preempt_for(self, req: Request, plan: StepPlan) -> bool:
        """Preempt the last running request for waiting `req` if `req` outranks it in
        priority; True if it did."""
        if not self.running or self.running[-1].priority >= req.priority:
            return False
        self._preempt(self.running[-1], plan)
        return True

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        """Free `req`'s blocks and queue it again; drop its row from this step's plan."""
        self.running.remove(req)
        self.pool.free(req.preempt())
        self.waiting.push(req)
        self.preempted += 1
        _drop_from_plan(plan, req)
        log.debug("step %d: preempted %s", plan.step, req.request_id)

    # -- helpers: outcomes ---------------------------------------------------------
    def _reject(self, req: Request, plan: StepPlan, now: float, message: str) -> None:
        """Undo a failed admission of `req` and end it with `message`."""
        self.waiting.remove(req)
        _drop_from_plan(plan, req)
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

    def _cancel(self, req: Request, ending: Ending, now: float) -> None:
        req.cancel_reason = ending
        if req.status is RequestStatus.WAITING:  # holds no block: it leaves the queue now
            self.waiting.remove(req)
            self._end(req, ending, now)
        else:
            self._to_cancel[req.key] = req

    def _finish_cancelled(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            req = heapq.heappop(self._deadlines)[2]
            if not req.is_finished and req.cancel_reason is None:
                self._cancel(req, DEADLINE_EXCEEDED, now)
        for req in list(self._to_cancel.values()):  # running: waiting ones ended in `_cancel`
            self._end(req, req.cancel_reason or CANCELLED, now)
        self._to_cancel.clear()

    def _end(self, req: Request, ending: Ending, now: float) -> None:
        finish = req.finish(ending.reason, now, message=ending.message, cause=ending.cause)
        self._retire(req, [finish])

    def _retire(self, req: Request, events: list[Event]) -> None:
        """`req` has finished: queue its last events, free its blocks, forget it. Samples
        it still holds (it never reached its fork point) end the same way."""
        self._outbox.append((req, events))
        if req.blocks:
            self.pool.free(req.blocks)
            req.blocks = []
        if req in self.running:
            self.running.remove(req)
        samples = self._by_id.get(req.request_id, {})
        if samples.get(req.index) is req:
            del samples[req.index]
            if not samples:
                del self._by_id[req.request_id]
        if self._to_cancel.get(req.key) is req:
            del self._to_cancel[req.key]
        self.waiting.remove(req)
        self._prune_deadlines()
        followers, req.followers = req.followers, []
        end = events[-1]
        if followers and isinstance(end, FinishEvent):
            now = self.clock()
            for f in followers:
                finish = f.finish(end.reason, now, message=end.message, cause=end.cause)
                self._outbox.append((f, [finish]))

    def _prune_deadlines(self) -> None:
        """Drop finished requests from the deadline heap (amortised O(1) per request)."""
        live = len(self.waiting) + len(self.running)  # what the heap may hold entries of
        if not live:
            self._deadlines.clear()
        elif len(self._deadlines) > 2 * live + _STALE_SLACK:
            self._deadlines = [e for e in self._deadlines if not e[2].is_finished]
            heapq.heapify(self._deadlines)


def _drop_from_plan(plan: StepPlan, req: Request) -> None:
    """Take `req`'s row out of the plan being built (it was preempted or rejected)."""
    plan.decode = [r for r in plan.decode if (r.request_id, r.sample) != req.key]
    plan.prefill = [r for r in plan.prefill if (r.request_id, r.sample) != req.key]
