"""The engine's settings, importable without torch (the serve flags take their defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api.limits import RequestLimits

DEFAULT_PRIORITY_STEP = 10.0  # seconds of waiting one priority step is worth (ageing)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings; the `treadle serve` flags map onto these."""

    model: str | None = None  # None: the embedded SmolLM2; else a folder, .gguf or hub id
    device: str | None = None  # None: cuda if available, else cpu
    max_batch_rows: int = 64  # sequences running at once (KV rows)
    max_seq_len: int | None = None  # KV positions per row; None: min(context, 2048)
    prefill_token_budget: int = 512  # prompt tokens admitted per step
    prefix_cache_rows: int = 4  # spare KV rows caching recent prompts' KV; 0 = off
    max_waiting: int = 1024  # queued requests beyond which submit raises QueueFullError
    seed: int | None = None  # sampling seed for requests without their own
    priority_step: float = DEFAULT_PRIORITY_STEP  # see waiting_queue.py; must be > 0
    limits: RequestLimits = field(default_factory=RequestLimits)
