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
    max_batch_rows: int = 64  # sequences running at once
    max_seq_len: int | None = None  # positions one request may hold; None: the model's context
    kv_cache_memory: int | None = None  # bytes of KV pool; None: 1 GiB on CPU, a share on CUDA
    block_size: int = 16  # positions per KV block
    step_token_budget: int = 256  # tokens fed per step: decodes first, then prompt chunks
    prefix_cache: bool = True  # reuse the KV of cached full blocks of earlier prompts
    max_waiting: int = 1024  # queued requests beyond which submit raises QueueFullError
    seed: int | None = None  # sampling seed for requests without their own
    priority_step: float = DEFAULT_PRIORITY_STEP  # see waiting_queue.py; must be > 0
    limits: RequestLimits = field(default_factory=RequestLimits)
