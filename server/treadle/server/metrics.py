"""Prometheus metrics of one server (prefix `treadle_`, unit suffixes, own registry).

Gauges that describe the engine's state are read at scrape time; the rest is
fed from the engine's step observer (on the step thread; prometheus-client
is thread-safe) and from the frontend's error handling.

Tokens are counted per sample (a request asking for n samples generates all
of theirs); a request is counted once, however many samples it has: the
request-level figures (finished requests, prompt tokens, latencies) come from
the finish of its sample 0, which every request has.

Two frontends (gRPC and the OpenAI-compatible HTTP) feed one registry: the
`treadle_frontend_*` series carry a `frontend` label ("grpc", "http"); the
older series are left as they were (`treadle_errors_total{code}` counts both).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..scheduler.engine import Engine
from ..scheduler.step_stats import StepStats

# Explicit buckets, in seconds (or rows), sized for CPU and GPU serving alike.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)

_RATE_WINDOW_S = 10.0  # tokens/sec gauge: tokens generated over this many seconds


class ServerMetrics:
    """Every metric the server exports, in one `CollectorRegistry`."""

    def __init__(self, model_name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # for the tokens/s window
        self.registry = r = CollectorRegistry()
        Gauge("treadle_model_info", "The served model.", ["model"], registry=r).labels(
            model=model_name
        ).set(1)
        self.queue_depth = Gauge("treadle_queue_depth", "Requests waiting to run.", registry=r)
        self.running = Gauge("treadle_running_requests", "Requests holding KV blocks.", registry=r)
        self.kv_tokens = Gauge(
            "treadle_kv_cache_tokens", "Positions the KV cache pool holds.", registry=r
        )
        self.kv_usage = Gauge(
            "treadle_kv_usage_ratio", "Share of KV blocks held by running requests.", registry=r
        )
        self.preemptions = Counter(
            "treadle_preemptions", "Running requests sent back to the queue.", registry=r
        )
        self.prompt_tokens = Counter(
            "treadle_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "treadle_cached_prompt_tokens",
            "Prompt tokens of finished requests found in the prefix cache.",
            registry=r,
        )
        self.generated_tokens = Counter("treadle_generated_tokens", "Tokens generated.", registry=r)
        self.tokens_per_second = Gauge(
            "treadle_generated_tokens_per_second",
            f"Tokens generated per second over the last {_RATE_WINDOW_S:.0f} s.",
            registry=r,
        )
        self.ttft = Histogram(
            "treadle_time_to_first_token_seconds",
            "Arrival to first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "treadle_inter_token_latency_seconds",
            "Gap between consecutive tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "treadle_queue_time_seconds",
            "Arrival to admission into the batch.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "treadle_request_latency_seconds",
            "Arrival to the terminal event.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "treadle_batch_size_rows", "Rows in a step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_time = Histogram(
            "treadle_step_duration_seconds",
            "Duration of a whole step.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.forward_time = Histogram(
            "treadle_forward_duration_seconds",
            "Duration of the model forward of a step.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "treadle_requests_finished", "Requests ended, by reason.", ["reason"], registry=r
        )
        self.errors = Counter(
            "treadle_errors",
            "Requests refused or failed, by gRPC status code.",
            ["code"],
            registry=r,
        )
        self.frontend_requests = Counter(
            "treadle_frontend_requests",
            "Requests accepted (queued), by frontend.",
            ["frontend"],
            registry=r,
        )
        self.frontend_errors = Counter(
            "treadle_frontend_errors",
            "Requests refused or failed, by frontend and gRPC status code.",
            ["frontend", "code"],
            registry=r,
        )
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._kv_blocks = 0  # the pool's, once attached
        self._lock = threading.Lock()
        self.tokens_per_second.set_function(self._rate)

    def attach(self, engine: Engine) -> None:
        """Follow `engine`: state gauges read it at scrape time, steps feed the rest."""
        self.queue_depth.set_function(lambda: engine.num_waiting)
        self.running.set_function(lambda: engine.num_running)
        self.kv_tokens.set(engine.info.kv_cache_tokens)
        self._kv_blocks = engine.info.kv_cache_tokens // engine.info.block_size
        engine.step_observers.append(self.observe_step)

    def observe_step(self, stats: StepStats) -> None:
        """Feed one step's figures (called on the engine's step thread)."""
        self.generated_tokens.inc(stats.generated_tokens)
        self._observe_rate(stats.generated_tokens)
        self.preemptions.inc(stats.preempted)
        if self._kv_blocks:
            self.kv_usage.set(stats.kv_blocks_used / self._kv_blocks)
        rows = stats.decode_rows + stats.prefill_rows
        if rows:
            self.batch_size.observe(rows)
            self.step_time.observe(stats.step_seconds)
            self.forward_time.observe(stats.forward_seconds)
        for gap in stats.inter_token_seconds:
            self.itl.observe(gap)
        for event in stats.finished:
            if event.index != 0:  # the request is counted at its sample 0's finish
                continue
            usage = event.usage
            self.finished.labels(reason=event.reason.value).inc()
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.cached_prompt_tokens.inc(usage.cached_prompt_tokens)
            self.e2e.observe(usage.total_seconds)
            if usage.time_to_first_token_seconds is not None:
                self.ttft.observe(usage.time_to_first_token_seconds)
                self.queue_time.observe(usage.queue_seconds)

    def count_request(self, frontend: str = "grpc") -> None:
        """A request accepted through `frontend` ("grpc" or "http")."""
        self.frontend_requests.labels(frontend=frontend).inc()

    def count_error(self, code_name: str, frontend: str = "grpc") -> None:
        """A request refused or failed with this status code (e.g. "INVALID_ARGUMENT"),
        through `frontend` ("grpc" or "http"; an HTTP error counts under the gRPC code
        of the same meaning, so alerts on codes cover both)."""
        self.errors.labels(code=code_name).inc()
        self.frontend_errors.labels(frontend=frontend, code=code_name).inc()

    def _observe_rate(self, tokens: int) -> None:
        """Record a step's tokens; pruned here too, so an unscraped server holds one window."""
        now = self._clock()
        with self._lock:
            self._window.append((now, tokens))
            self._prune(now)

    def _rate(self) -> float:
        with self._lock:
            self._prune(self._clock())
            return sum(n for _, n in self._window) / _RATE_WINDOW_S

    def _prune(self, now: float) -> None:
        """Drop entries older than the window (hold `_lock`)."""
        cutoff = now - _RATE_WINDOW_S
        while self._window and self._window[0][0] < cutoff:
            self._window.popleft()
