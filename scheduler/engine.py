"""The in-process engine: scheduler + worker + the step loop on its own thread.

    engine = Engine.load(EngineConfig())
    engine.start()
    async for event in engine.generate(GenerationRequest(prompt="Hi", max_new_tokens=8)):
        ...
    engine.stop()

Requests and aborts reach the step thread as messages through an inbox; the
thread runs schedule -> execute -> update and hands each request's events to
its sink. A request's events are delivered in order, and every accepted
request gets exactly one terminal event.
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..worker.loader import LoadedModel, load_model
from ..worker.plugins import PluginRegistry, default_registry
from ..worker.worker import Worker, WorkerConfig
from .engine_config import EngineConfig
from .errors import DuplicateRequestError, EngineUnavailableError, QueueFullError
from .event_stream import EventStream
from .events import CANCELLED, SHUTTING_DOWN, Ending, Event, FinishEvent, FinishReason
from .generation_request import GenerationRequest
from .inputs import InputProcessor
from .request import EventSink, Request
from .scheduler import Scheduler, SchedulerConfig, StepTokens
from .step_stats import StepStats
from .validation import ModelLimits, RequestFactory

log = logging.getLogger("treadle.engine")


_SCHEDULER_ERROR = Ending(FinishReason.ERROR, "internal error in the scheduler")


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str
    ending: Ending


@dataclass(frozen=True, slots=True)
class _AbortAll:
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
        self._inbox: queue.SimpleQueue[Request | _Abort | _AbortAll] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
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
        self._accepting = False

    def stop(self, grace: float = 0.0, timeout: float = 30.0) -> None:
        """Stop accepting; let running requests finish for `grace` seconds; cancel the rest.

        Every request still in flight gets its terminal event (cancelled)
        before the step thread ends.
        """
        self._accepting = False
        if self._thread is None:
            return
        if grace > 0:
            self._idle.wait(grace)
        self._inbox.put(_AbortAll(SHUTTING_DOWN))
        self._wake.set()
        self._closing = True
        self._thread.join(timeout)
        self._thread = None

    # -- requests ---------------------------------------------------------------
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
        """
        if not self._accepting:
            raise EngineUnavailableError("the engine is not accepting requests")
        request_id = gen.request_id or uuid.uuid4().hex
        req = self.factory.build(gen, request_id, sink)
        with self._lock:
            if request_id in self._in_flight:
                raise DuplicateRequestError(f"request_id: {request_id!r} is already in flight")
            if self.num_waiting >= self.config.max_waiting:
                raise QueueFullError(
                    f"the queue is full ({self.config.max_waiting} waiting requests); retry later"
                )
            self._in_flight.add(request_id)
        self._idle.clear()
        self._inbox.put(req)
        self._wake.set()
        return request_id

    def abort(self, request_id: str, ending: Ending = CANCELLED) -> None:
        """Ask a request to end; its row is freed on the next step. Unknown ids are ignored."""
        self._inbox.put(_Abort(request_id, ending))
        self._wake.set()

    def stream(self, gen: GenerationRequest) -> EventStream:
        """Submit `gen` and return the async iterator of its events (call on the event loop)."""
        loop = asyncio.get_running_loop()
        request_id = gen.request_id or uuid.uuid4().hex
        stream = EventStream(request_id, loop, self.abort)
        gen_with_id = gen if gen.request_id else _with_id(gen, request_id)
        self.submit(gen_with_id, stream.deliver)
        return stream

    async def open_stream(self, gen: GenerationRequest) -> EventStream:
        """Like `stream`, but validation, chat rendering and tokenizing run off the event loop.

        Raises what `submit` raises; nothing is queued then.
        """
        loop = asyncio.get_running_loop()
        request_id = gen.request_id or uuid.uuid4().hex
        stream = EventStream(request_id, loop, self.abort)
        gen_with_id = gen if gen.request_id else _with_id(gen, request_id)
        await asyncio.to_thread(self.submit, gen_with_id, stream.deliver)
        return stream

    async def generate(self, gen: GenerationRequest) -> AsyncIterator[Event]:
        """Yield the request's events until its terminal one; leaving early aborts it."""
        async with contextlib.aclosing(await self.open_stream(gen)) as stream:
            async for event in stream:
                yield event

    # -- the step thread --------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.clear()
            self._drain_inbox()
            if not self.scheduler.has_work:
                self._idle.set()
                if self._closing:
                    return
                self._wake.wait(timeout=1.0)
                continue
            try:
                self._step()
            except Exception:  # a scheduler bug: end what is in flight, keep serving
                log.exception("step loop error; ending the requests in flight")
                self.scheduler.abort_all(_SCHEDULER_ERROR)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, Request):
                try:
                    self.scheduler.add(msg)
                except ValueError as exc:  # validation should have caught it; end it cleanly
                    msg.sink([msg.finish(FinishReason.ERROR, time.monotonic(), message=str(exc))])
                    with self._lock:
                        self._in_flight.discard(msg.request_id)
            elif isinstance(msg, _Abort):
                self.scheduler.abort(msg.request_id, msg.ending)
            else:
                self.scheduler.abort_all(msg.ending)

    def _step(self) -> None:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        forward_s = process_s = 0.0
        tokens = StepTokens()
        if not plan.is_empty:
            try:
                output = self.worker.execute(plan)
            except Exception as exc:  # the step failed: its rows end with an error, others go on
                log.exception("step %d failed", plan.step)
                self.scheduler.fail(plan, f"internal error: {type(exc).__name__}: {exc}")
            else:
                tokens = self.scheduler.update(plan, output)
                forward_s, process_s = output.forward_s, output.process_s
        outbox = self.scheduler.take_events()
        finished = [events[-1] for _, events in outbox if isinstance(events[-1], FinishEvent)]
        with self._lock:
            self._in_flight.difference_update(e.request_id for e in finished)
        stats = StepStats(
            step=plan.step,
            decode_rows=len(plan.decode),
            prefill_rows=len(plan.prefill),
            prefill_tokens=plan.num_tokens - len(plan.decode),
            forward_s=forward_s,
            process_s=process_s,
            step_s=time.perf_counter() - started,
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            generated_tokens=tokens.count,
            inter_token_s=tokens.inter_token_s,
            finished=finished,
        )
        for observe in self.step_observers:  # before delivery: metrics never lag the clients
            observe(stats)
        self._deliver(outbox)

    def _deliver(self, outbox: list[tuple[Request, list[Event]]]) -> None:
        for req, events in outbox:
            try:
                req.sink(events)
            except Exception:  # a broken consumer must not stop the loop
                log.exception("delivering events of %s failed", req.request_id)


def _with_id(gen: GenerationRequest, request_id: str) -> GenerationRequest:
    return dataclasses.replace(gen, request_id=request_id)
