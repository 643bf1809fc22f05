"""Every knob of a frontend run (W1 and W2 through `treadle serve`); engine defaults are W1's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from treadle.scheduler.engine_config import EngineConfig

from .settings import W1Settings


@dataclass(frozen=True)
class GrpcSettings:
    requests: int | None = None  # first N requests of the workload; None: all
    warmup: bool = True  # one short untimed request before each timed run
    clients: int = W1Settings.clients  # W1's closed-loop clients
    max_batch_rows: int = W1Settings.max_batch_rows
    max_seq_len: int = W1Settings.max_seq_len
    step_token_budget: int = W1Settings.step_token_budget
    kv_cache_memory: int | None = W1Settings.kv_cache_memory
    prefix_cache: bool = W1Settings.prefix_cache
    load: float = 0.7  # W2's arrival rate as a share of the W1 gRPC capacity
    rate: float | None = None  # W2's arrival rate (requests/s); None: load x capacity
    seed: int = 0  # seeds W2's Poisson arrivals
    w2_inprocess: bool = True  # also run W2 on the in-process engine, after the servers
    http: bool = True  # also run W1 over HTTP streaming, on a fresh server of its own
    server_timeout_s: float = 600.0  # most seconds from starting the server to SERVING

    def __post_init__(self) -> None:
        if not self.load > 0:
            raise ValueError(f"load must be positive, got {self.load}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")

    def engine_config(self) -> EngineConfig:
        """The engine both paths run: in-process, and the server's (through its flags)."""
        return EngineConfig(
            max_batch_rows=self.max_batch_rows,
            max_seq_len=self.max_seq_len,
            kv_cache_memory=self.kv_cache_memory,
            step_token_budget=self.step_token_budget,
            prefix_cache=self.prefix_cache,
        )

    def w2_rate(self, capacity_rps: float) -> float:
        """W2's arrival rate: `rate` if set, else `load` x the measured capacity."""
        return self.rate if self.rate is not None else self.load * capacity_rps

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: these settings and the full engine config they give."""
        out = dataclasses.asdict(self)
        out["engine"] = dataclasses.asdict(self.engine_config())
        return out
