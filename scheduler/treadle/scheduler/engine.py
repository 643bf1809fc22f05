"""The in-process engine: scheduler + worker + the step loop on its own thread.

    engine = Engine.load(EngineConfig())
    engine.start()
    async for event in engine.generate(GenerationRequest(prompt="Hi", max_new_tokens=8)):
        ...
    engine.stop()

Requests and aborts reach the step thread as messages through an `Inbox`,
which also keeps the registry of requests in flight; each step runs schedule
-> execute -> update -> deliver, handing each request's events to its sink.
A request's events are delivered in order, and every accepted request gets
exactly one terminal event, whatever fails: a failure inside a
step ends only the requests it touched (see `scheduler.py`), and if the step
thread dies anyway every request in flight gets an ERROR event, the engine
stops accepting and `on_fatal` listeners are told.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from ..api.outcome import FinishReason
from ..api.params import RESPONSE_FORMAT_TYPES
from ..worker.grammar import GrammarCompiler
from ..worker.loader import LoadedModel, load_model
from ..worker.plan import StepOutput, StepPlan
from ..worker.plugins import PluginRegistry, default_registry
from ..worker.worker import Worker, WorkerConfig
from .engine_config import EngineConfig, default_step_token_budget
from .engine_info import EngineInfo
from .errors import EngineUnavailableError, QueueFullError
from .event_stream import DEFAULT_BACKLOG, EventStream
from .events import CANCELLED, SHUTTING_DOWN, Ending, Event, FinishEvent
from .gc_freeze import freeze_startup_objects
from .generation_request import GenerationRequest
from .inbox import Abort, Inbox
from .inputs import InputProcessor
from .request import EventSink, Request
from .scheduler import Scheduler, SchedulerConfig, StepTokens, internal_error, require
from .step_stats import StepStats, step_stats
from .validation import ModelLimits, RequestFactory

log = logging.getLogger("treadle.engine")


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
                max_batch_rows=config.max_batch_rows,
                max_seq_len=config.max_seq_len,
                kv_cache_memory=config.kv_cache_memory,
                decode_lanes_memory=config.decode_lanes_memory,
                block_size=config.block_size,
                seed=config.seed,
            ),
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=self.worker.num_blocks,
                block_size=self.worker.block_size,
                max_batch_rows=config.max_batch_rows,
                max_seq_len=self.worker.max_seq_len,
                step_token_budget=config.step_token_budget
                or default_step_token_budget(loaded.device.type),
                attention_span=self.worker.attention_span,
                prefix_cache=config.prefix_cache,
                priority_step=config.priority_step,
            )
        )
        self.plugins = plugins or default_registry()
        pool_tokens = self.scheduler.config.pool_tokens
        self.model_limits = ModelLimits(
            vocab_size=loaded.vocab_size,
            max_total_tokens=min(self.worker.max_seq_len, pool_tokens),
            eos_token_ids=loaded.eos_token_ids,
            bound="context" if self.worker.max_seq_len <= pool_tokens else "KV pool",
            max_rows=self.scheduler.config.max_batch_rows,
            pool_blocks=self.scheduler.config.num_blocks,
            block_size=self.scheduler.config.block_size,
        )
        self.inputs = InputProcessor(
            loaded.tokenizer, loaded.vocab_size, loaded.processor, loaded.image_token_id
        )
        grammars = GrammarCompiler(
            loaded.tokenizer,
            loaded.vocab_size,
            loaded.eos_token_ids,
            config.limits.response_format_compile_seconds,
        )
        self.factory = RequestFactory(
            self.inputs, self.model_limits, config.limits, self.plugins, grammars
        )
        self.step_observers: list[Callable[[StepStats], None]] = []
        # Called once, from the dying step thread, after every request in flight got its
        # terminal ERROR event (the server turns NOT_SERVING and exits non-zero).
        self.on_fatal: list[Callable[[BaseException], None]] = []
        self._inbox = Inbox()
        # Events taken from the scheduler and not handed to their sinks yet (step thread
        # only): kept here, not in a local, so that `_die` still delivers them.
        self._undelivered: deque[tuple[Request, list[Event]]] = deque()
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
        """Start the step thread and accept requests (after freezing the objects alive now
        out of the garbage collector's full passes, `gc_freeze.py`)."""
        if self._thread is not None:
            return
        freeze_startup_objects()
        self._thread = threading.Thread(target=self._run, name="treadle-step", daemon=True)
        self._inbox.open()
        self._thread.start()

    def stop_accepting(self) -> None:
        """Refuse new requests (EngineUnavailableError); those in flight go on."""
        self._inbox.close()

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
        self._inbox.wake()
        self._thread.join(timeout)
        self._thread = None

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until no accepted request is in flight and its events are delivered.

        Returns False if `timeout` seconds passed first.
        """
        return self._inbox.wait_until_idle(timeout)

    # -- what frontends read ---------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        """The served model and the engine's limits."""
        return EngineInfo(
            model=self.loaded.name,
            context_length=self.loaded.context_length,
            max_total_tokens=self.model_limits.max_total_tokens,
            vocab_size=self.loaded.vocab_size,
            eos_token_ids=self.loaded.eos_token_ids,
            max_batch_rows=self.scheduler.config.max_batch_rows,
            kv_cache_tokens=self.scheduler.config.pool_tokens,
            block_size=self.scheduler.config.block_size,
            max_waiting=self.config.max_waiting,
            max_prompt_chars=self.factory.max_prompt_chars,
            plugins=tuple(self.plugins.names()),
            has_chat_template=self.inputs.has_chat_template,
            accepts_images=self.inputs.accepts_images,
            response_format_types=RESPONSE_FORMAT_TYPES if self.factory.grammars.available else (),
            limits=self.config.limits,
        )

    def tokenize(self, gen: GenerationRequest) -> tuple[list[int], list[str]]:
        """The token ids of `gen`'s input and their token strings, its size checked first
        (raises ValidationError). Blocking: call it off the event loop."""
        ids = self.factory.prompt_ids(gen)
        return ids, [str(t) for t in self.inputs.tokenizer.convert_ids_to_tokens(ids)]

    def token_strings(self) -> list[str]:
        """Every token id's string, in id order, as the tokenizer spells it (ids past the
        tokenizer's vocabulary, where the logits are wider, read "None"). Blocking."""
        ids = list(range(self.info.vocab_size))
        return [str(t) for t in self.inputs.tokenizer.convert_ids_to_tokens(ids)]

    @property
    def accepting(self) -> bool:
        """Whether `submit` takes new requests (False before `start`, and once stopping)."""
        return self._inbox.is_open

    @property
    def num_in_flight(self) -> int:
        """Accepted requests whose terminal event is not produced yet."""
        return len(self._inbox)

    @property
    def num_running(self) -> int:
        """Requests holding a row."""
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        """Accepted requests that do not hold a row yet."""
        return max(0, len(self._inbox) - self.scheduler.num_running)

    def submit(self, gen: GenerationRequest, sink: EventSink) -> str:
        """Validate and queue a request; its events go to `sink` from the step thread.

        Returns the request id. Raises ValidationError, QueueFullError,
        DuplicateRequestError or EngineUnavailableError; nothing is queued then.
        Once it returns, the request is in flight: `stop(grace)` waits for it
        and it gets exactly one terminal event.
        """
        if not self._inbox.is_open:  # before building: refusing costs nothing
            raise EngineUnavailableError("the engine is not accepting requests")
        request_id = gen.request_id or uuid.uuid4().hex
        req = self.factory.build(gen, request_id, sink)
        max_waiting = self.config.max_waiting

        def admit(in_flight: int) -> None:
            if in_flight - self.scheduler.num_running >= max_waiting:
                raise QueueFullError(
                    f"the queue is full ({max_waiting} waiting requests); retry later"
                )

        self._inbox.put(req, admit)
        return request_id

    def abort(self, request_id: str, ending: Ending = CANCELLED) -> None:
        """Ask a request to end; its row is freed on the next step. Unknown ids are ignored."""
        self._inbox.abort(request_id, ending)

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
        stream = EventStream(
            request_id, asyncio.get_running_loop(), self.abort, backlog, samples=gen.n
        )
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
        registry = self._inbox.snapshot()
        for req in self.scheduler.requests():
            samples = registry.get(req.request_id, [])
            require(any(s is req for s in samples), f"{req.key} is not in flight")
        for samples in registry.values():
            for req in samples:
                require(not req.is_finished, f"finished request {req.key} is still in flight")

    # -- the step thread --------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # nothing recovered: end everything, tell the listeners
            self._die(exc)

    def _loop(self) -> None:
        while True:
            self._drain_inbox()
            if self._closing:  # also ends requests that arrived since the stop began
                self.scheduler.abort_all(SHUTTING_DOWN)
            if self.scheduler.has_work:
                self._step()
            elif self.scheduler.has_events:  # waiting requests that were just cancelled
                self._publish(self._stats(StepPlan(step=self.scheduler.steps), None, None))
            elif self._closing and not len(self._inbox):
                return
            else:
                self._inbox.wait(timeout=1.0)

    def _drain_inbox(self) -> None:
        for msg in self._inbox.take():
            if isinstance(msg, Abort):
                self.scheduler.abort(msg.request_id, msg.ending)
                continue
            try:
                self.scheduler.add(msg)
            except Exception:  # validation should have caught it; end it cleanly
                message = internal_error(f"queueing {msg.request_id} failed")
                samples = [msg, *msg.followers]
                for req in samples:
                    finish = req.finish(FinishReason.ERROR, time.monotonic(), message=message)
                    self._undelivered.append((req, [finish]))
                self._inbox.forget(samples)
                try:
                    self._deliver()
                finally:
                    self._inbox.done_delivering()

    def _step(self) -> None:
        """One step: schedule -> execute -> update -> deliver. A failure ends the requests
        it touched (all of them if scheduling failed); the engine goes on."""
        started = time.perf_counter()
        plan = self._schedule()
        output = self._execute(plan)
        tokens = self._update(plan, output)
        self._publish(self._stats(plan, output, tokens, started))

    def _schedule(self) -> StepPlan:
        try:
            return self.scheduler.schedule()
        except Exception:  # no request explains it: end every one, keep serving
            self.scheduler.fail_all(internal_error("scheduling failed; ending every request"))
            return StepPlan(step=self.scheduler.steps)

    def _execute(self, plan: StepPlan) -> StepOutput | None:
        """The worker's output; None for an empty plan or when the worker failed it."""
        if plan.is_empty:
            return None
        try:
            return self.worker.execute(plan)
        except Exception:
            self.scheduler.fail(plan, internal_error(f"step {plan.step} failed in the worker"))
            return None

    def _update(self, plan: StepPlan, output: StepOutput | None) -> StepTokens:
        if output is None:
            return StepTokens()
        try:
            return self.scheduler.update(plan, output)
        except Exception:
            self.scheduler.fail(plan, internal_error(f"step {plan.step} failed in update"))
            return StepTokens()

    def _stats(
        self,
        plan: StepPlan,
        output: StepOutput | None,
        tokens: StepTokens | None,
        started: float | None = None,
    ) -> StepStats:
        """The step's figures; its finished requests are filled in by `_publish`."""
        seconds = time.perf_counter() - started if started is not None else 0.0
        return step_stats(
            plan,
            output,
            tokens or StepTokens(),
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            preempted=self.scheduler.preempted,
            kv_blocks_used=self.scheduler.pool.num_used,
            step_seconds=seconds,
        )

    def _publish(self, stats: StepStats) -> None:
        """Hand the scheduler's events out: registry first, then observers, then clients."""
        outbox = self.scheduler.take_events()
        self._undelivered.extend(outbox)
        ended = [(req, events[-1]) for req, events in outbox if isinstance(events[-1], FinishEvent)]
        finished = [finish for _, finish in ended]
        stats.finished.extend(finished)
        if finished:  # before delivery: a client may reuse an id once it sees its finish
            self._inbox.forget([req for req, _ in ended])
        try:
            for observe in self.step_observers:  # before delivery: metrics never lag the clients
                try:
                    observe(stats)
                except Exception:
                    log.exception("a step observer failed")
            self._deliver()
        finally:
            if finished:
                self._inbox.done_delivering()

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
        in_flight = self._inbox.fail()
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
        self._inbox.clear()
        for listener in list(self.on_fatal):
            try:
                listener(exc)
            except Exception:
                log.exception("an on_fatal listener failed")


def _with_id(gen: GenerationRequest, request_id: str) -> GenerationRequest:
    return dataclasses.replace(gen, request_id=request_id)
