"""The in-process engine: scheduler + worker + the step loop on its own thread.

    engine = Engine.load(EngineConfig())
    engine.start()
    async for event in engine.generate(GenerationRequest(prompt="Hi", max_new_tokens=8)):
        ...
    engine.stop()

Requests and aborts reach the step thread as messages through an inbox; the
thread runs schedule -> execute -> update and hands each request's events to
its sink. A request's events are delivered in order, and every accepted
request gets exactly one terminal event, whatever fails: a failure inside a
step ends only the requests it touched (see `scheduler.py`), and if the step
thread dies anyway every request in flight gets an ERROR event, the engine
stops accepting and `on_fatal` listeners are told.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..worker.loader import LoadedModel, load_model
from ..worker.plan import StepOutput, StepPlan
from ..worker.plugins import PluginRegistry, default_registry
from ..worker.worker import Worker, WorkerConfig
from .engine_config import EngineConfig
from .errors import DuplicateRequestError, EngineUnavailableError, QueueFullError
from .event_stream import DEFAULT_BACKLOG, EventStream
from .events import CANCELLED, SHUTTING_DOWN, Ending, Event, FinishEvent, FinishReason
from .generation_request import GenerationRequest
from .inputs import InputProcessor
from .request import EventSink, Request
from .scheduler import Scheduler, SchedulerConfig, StepTokens, internal_error, require
from .step_stats import StepStats
from .validation import ModelLimits, RequestFactory

log = logging.getLogger("treadle.engine")


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str
    ending: Ending


class Engine:
    """A continuous-batching engine for one model, usable in-process.

    Thread-safe: `submit`, `abort` and `stream` may be called from any thread;
    `generate` from any asyncio loop. Validation errors (`ValidationError`),
    a full queue (`QueueFullError`) and a stopped engine
    (`EngineUnavailableError`) raise before anything is queued.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        plugins: PluginRegistry | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.loaded = loaded
        self.worker = Worker(
            loaded,
            WorkerConfig(
                max_rows=config.max_batch_rows,
                max_seq_len=config.max_seq_len,
                seed=config.seed,
                spare_rows=config.prefix_cache_rows,
            ),
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_rows=self.worker.max_rows,
                max_seq_len=self.worker.max_seq_len,
                prefill_token_budget=config.prefill_token_budget,
                prefix_cache_rows=config.prefix_cache_rows,
                priority_step_s=config.priority_step_s,
            )
        )
        self.plugins = plugins or default_registry()
        self.model_limits = ModelLimits(
            vocab_size=loaded.vocab_size,
            max_total_len=self.worker.max_seq_len,
            eos_token_ids=loaded.eos_token_ids,
        )
        self.inputs = InputProcessor(loaded.tokenizer, loaded.vocab_size)
        self.factory = RequestFactory(self.inputs, self.model_limits, config.limits, self.plugins)
        self.step_observers: list[Callable[[StepStats], None]] = []
        # Called once, from the dying step thread, after every request in flight got its
        # terminal ERROR event (the server turns NOT_SERVING and exits non-zero).
        self.on_fatal: list[Callable[[BaseException], None]] = []
        self._inbox: queue.SimpleQueue[Request | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # the registry emptied or delivery ended
        self._in_flight: dict[str, Request] = {}  # accepted, terminal event not produced yet
        self._delivering = False  # the step thread is handing out events of finished requests
        # Events taken from the scheduler and not handed to their sinks yet (step thread
        # only): kept here, not in a local, so that `_die` still delivers them.
        self._undelivered: deque[tuple[Request, list[Event]]] = deque()
        self._accepting = False
        self._closing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def load(
        cls, config: EngineConfig | None = None, plugins: PluginRegistry | None = None
    ) -> Engine:
        """Load the configured model and build an engine (not started)."""
        config = config or EngineConfig()
        return cls(load_model(config.model, device=config.device), config, plugins)

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Start the step thread and accept requests."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="treadle-step", daemon=True)
        self._accepting = True
        self._thread.start()

    def stop_accepting(self) -> None:
        """Refuse new requests (EngineUnavailableError); those in flight go on."""
        with self._lock:
            self._accepting = False

    def stop(self, grace: float = 0.0, timeout: float = 30.0) -> None:
        """Stop accepting; let accepted requests finish for `grace` seconds; cancel the rest.

        Waits for every request accepted before the call (even one the step
        thread has not seen yet). Every request still in flight then gets its
        terminal event (cancelled, cause SHUTDOWN) before the step thread ends.
        """
        self.stop_accepting()
        if self._thread is None:
            return
        if grace > 0:
            self.wait_until_idle(grace)
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until no accepted request is in flight and its events are delivered.

        Returns False if `timeout` seconds passed first.
        """
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._in_flight and not self._delivering, timeout
            )

    # -- requests ---------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """Whether `submit` takes new requests (False before `start`, and once stopping)."""
        return self._accepting

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def num_waiting(self) -> int:
        """Accepted requests that do not hold a row yet."""
        return max(0, len(self._in_flight) - self.scheduler.num_running)

    def submit(self, gen: GenerationRequest, sink: EventSink) -> str:
        """Validate and queue a request; its events go to `sink` from the step thread.

        Returns the request id. Raises ValidationError, QueueFullError,
        DuplicateRequestError or EngineUnavailableError; nothing is queued then.
        Once it returns, the request is in flight: `stop(grace)` waits for it
        and it gets exactly one terminal event.
        """
        if not self._accepting:
            raise EngineUnavailableError("the engine is not accepting requests")
        request_id = gen.request_id or uuid.uuid4().hex
        req = self.factory.build(gen, request_id, sink)
        with self._lock:
            if not self._accepting:  # stopped while the request was being built
                raise EngineUnavailableError("the engine is not accepting requests")
            if request_id in self._in_flight:
                raise DuplicateRequestError(f"request_id: {request_id!r} is already in flight")
            if self.num_waiting >= self.config.max_waiting:
                raise QueueFullError(
                    f"the queue is full ({self.config.max_waiting} waiting requests); retry later"
                )
            self._in_flight[request_id] = req
        self._inbox.put(req)
        self._wake.set()
        return request_id

    def abort(self, request_id: str, ending: Ending = CANCELLED) -> None:
        """Ask a request to end; its row is freed on the next step. Unknown ids are ignored."""
        self._inbox.put(_Abort(request_id, ending))
        self._wake.set()

    def stream(self, gen: GenerationRequest, max_backlog: int | None = None) -> EventStream:
        """Submit `gen` and return the async iterator of its events (call on the event loop).

        `max_backlog`: unread deliveries before the request is cut as a slow
        reader (`EventStream`); None: the default, `DEFAULT_BACKLOG`.
        """
        stream, gen_with_id = self._new_stream(gen, max_backlog)
        self.submit(gen_with_id, stream.deliver)
        return stream

    async def open_stream(
        self, gen: GenerationRequest, max_backlog: int | None = None
    ) -> EventStream:
        """Like `stream`, but validation, chat rendering and tokenizing run off the event loop.

        Raises what `submit` raises; nothing is queued then. If the caller is
        cancelled while the request is being built, the request is aborted as
        soon as it is queued: nothing runs with nobody reading. `max_backlog`
        is in force from the first event on (see `stream`).
        """
        stream, gen_with_id = self._new_stream(gen, max_backlog)
        request_id = stream.request_id
        abandoned = threading.Event()

        def submit() -> None:
            self.submit(gen_with_id, stream.deliver)
            if abandoned.is_set():  # the caller left while this thread was submitting
                self.abort(request_id)

        try:
            await asyncio.to_thread(submit)
        except asyncio.CancelledError:
            abandoned.set()  # before the abort below: one of the two sees the request queued
            self.abort(request_id)
            raise
        return stream

    def _new_stream(
        self, gen: GenerationRequest, max_backlog: int | None
    ) -> tuple[EventStream, GenerationRequest]:
        """The stream for `gen` on the running loop, and `gen` with its request id set."""
        request_id = gen.request_id or uuid.uuid4().hex
        backlog = DEFAULT_BACKLOG if max_backlog is None else max_backlog
        stream = EventStream(request_id, asyncio.get_running_loop(), self.abort, backlog)
        return stream, gen if gen.request_id else _with_id(gen, request_id)

    async def generate(self, gen: GenerationRequest) -> AsyncIterator[Event]:
        """Yield the request's events until its terminal one; leaving early aborts it."""
        async with contextlib.aclosing(await self.open_stream(gen)) as stream:
            async for event in stream:
                yield event

    # -- invariants -----------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise InvariantError unless the engine's bookkeeping is consistent.

        The scheduler's own invariants hold, every request it holds is in the
        engine's in-flight registry (as the same object), and nothing in the
        registry has finished. Call it on the step thread (e.g. from a step
        observer): the registry also holds accepted requests still in the inbox.
        """
        self.scheduler.check_invariants()
        with self._lock:
            registry = dict(self._in_flight)
        for req in self.scheduler.requests():
            require(registry.get(req.request_id) is req, f"{req.request_id} is not in flight")
        for request_id, req in registry.items():
            require(not req.is_finished, f"finished request {request_id} is still in flight")

    # -- the step thread --------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # nothing recovered: end everything, tell the listeners
            self._die(exc)

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            self._drain_inbox()
            if self._closing:  # also ends requests that arrived since the stop began
                self.scheduler.abort_all(SHUTTING_DOWN)
            if self.scheduler.has_work:
                self._step()
            elif self.scheduler.has_events:  # waiting requests that were just cancelled
                self._publish(StepPlan(step=self.scheduler.steps), None, StepTokens(), None)
            elif self._closing and self._registry_empty():
                return
            else:
                self._wake.wait(timeout=1.0)

    def _registry_empty(self) -> bool:
        with self._lock:
            return not self._in_flight

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, _Abort):
                self.scheduler.abort(msg.request_id, msg.ending)
                continue
            try:
                self.scheduler.add(msg)
            except Exception:  # validation should have caught it; end it cleanly
                message = internal_error(f"queueing {msg.request_id} failed")
                finish = msg.finish(FinishReason.ERROR, time.monotonic(), message=message)
                self._undelivered.append((msg, [finish]))
                self._forget([msg.request_id], delivering=True)
                try:
                    self._deliver()
                finally:
                    self._done_delivering()

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            plan = self.scheduler.schedule()
        except Exception:  # no request explains it: end every one, keep serving
            self.scheduler.fail_all(internal_error("scheduling failed; ending every request"))
            self._publish(StepPlan(step=self.scheduler.steps), None, StepTokens(), started)
            return
        output, tokens = (None, StepTokens()) if plan.is_empty else self._run_plan(plan)
        self._publish(plan, output, tokens, started)

    def _run_plan(self, plan: StepPlan) -> tuple[StepOutput | None, StepTokens]:
        """Execute and apply one plan; a failure ends the plan's rows, the queue goes on."""
        try:
            output = self.worker.execute(plan)
        except Exception:
            self.scheduler.fail(plan, internal_error(f"step {plan.step} failed in the worker"))
            return None, StepTokens()
        try:
            return output, self.scheduler.update(plan, output)
        except Exception:
            self.scheduler.fail(plan, internal_error(f"step {plan.step} failed in update"))
            return output, StepTokens()

    def _publish(
        self,
        plan: StepPlan,
        output: StepOutput | None,
        tokens: StepTokens,
        started: float | None,
    ) -> None:
        """Hand the scheduler's events out: registry first, then observers, then clients."""
        outbox = self.scheduler.take_events()
        self._undelivered.extend(outbox)
        finished = [events[-1] for _, events in outbox if isinstance(events[-1], FinishEvent)]
        self._forget([e.request_id for e in finished], delivering=True)
        stats = StepStats(
            step=plan.step,
            decode_rows=len(plan.decode),
            prefill_rows=len(plan.prefill),
            prefill_tokens=plan.num_tokens - len(plan.decode),
            forward_s=output.forward_s if output else 0.0,
            process_s=output.process_s if output else 0.0,
            step_s=time.perf_counter() - started if started is not None else 0.0,
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            generated_tokens=tokens.count,
            inter_token_s=tokens.inter_token_s,
            finished=finished,
        )
        try:
            for observe in self.step_observers:  # before delivery: metrics never lag the clients
                try:
                    observe(stats)
                except Exception:
                    log.exception("a step observer failed")
            self._deliver()
        finally:
            self._done_delivering()

    def _forget(self, request_ids: list[str], delivering: bool = False) -> None:
        """Take finished requests out of the in-flight registry (before their events go out,
        so a client may reuse an id as soon as it sees its finish)."""
        with self._changed:
            for request_id in request_ids:
                self._in_flight.pop(request_id, None)
            self._delivering = delivering
            self._changed.notify_all()

    def _done_delivering(self) -> None:
        with self._changed:
            self._delivering = False
            self._changed.notify_all()

    def _deliver(self, survive: type[BaseException] = Exception) -> None:
        """Hand the undelivered events to their sinks, oldest first.

        An entry leaves `_undelivered` once its sink returned or raised `survive`
        (logged: a broken consumer must not stop the loop); if anything else
        escapes, the entry and those after it stay for `_die` to deliver.
        """
        while self._undelivered:
            req, events = self._undelivered[0]
            try:
                req.sink(events)
            except survive:
                log.exception("delivering events of %s failed", req.request_id)
            self._undelivered.popleft()

    def _die(self, exc: BaseException) -> None:
        """The step thread is ending on an error nothing recovered from.

        Stops accepting, delivers the events already produced (those taken from
        the scheduler but not delivered when the thread died included: their
        requests may have left the registry already), ends every other request
        in flight with one ERROR event, then calls the `on_fatal` listeners.
        """
        message = internal_error("the step thread died; ending every request in flight")
        log.critical("the engine stopped serving: %s", message)
        with self._changed:
            self._accepting = False
            self._delivering = True
            in_flight = list(self._in_flight.values())
        with contextlib.suppress(BaseException):
            self._undelivered.extend(self.scheduler.take_events())
        # by identity: an id whose finish is undelivered may be in flight again (reused)
        ended = {
            id(req) for req, events in self._undelivered if isinstance(events[-1], FinishEvent)
        }
        now = time.monotonic()
        for req in in_flight:
            if id(req) not in ended:
                self._undelivered.append(
                    (req, [req.finish(FinishReason.ERROR, now, message=message)])
                )
        self._deliver(survive=BaseException)
        with self._changed:
            self._in_flight.clear()
            self._delivering = False
            self._changed.notify_all()
        for listener in list(self.on_fatal):
            try:
                listener(exc)
            except Exception:
                log.exception("an on_fatal listener failed")


def _with_id(gen: GenerationRequest, request_id: str) -> GenerationRequest:
    return dataclasses.replace(gen, request_id=request_id)
