"""The engine's settings, importable without torch (the serve flags take their defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api.limits import RequestLimits

DEFAULT_PRIORITY_STEP = 10.0  # seconds of waiting one priority step is worth (ageing)


def default_step_token_budget(device_type: str) -> int:
    """Tokens per step when not configured (a prompt chunk counts its attention too, see
    step_budget.py). A step's cost grows with its tokens and the decoding streams wait for
    the whole step: on a 2-core CPU, 112 keeps 16 streams' worst gap at 2.2x their
    median while a 1,900-token prompt is prefilled, and that prompt's first token 1.3-1.6x
    later than in one whole step (bench/w3.py, two runs; 128: 2.5-3.8x and 1.4-1.5x, since
    decode steps got cheaper with the one KV buffer). A GPU runs 2048 tokens in about the
    time of one decode step."""
    return 2048 if device_type == "cuda" else 112


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings; the `treadle serve` flags map onto these."""

    model: str | None = None  # None: the embedded SmolLM2; else a folder, .gguf or hub id
    device: str | None = None  # None: cuda if available, else cpu
    max_batch_rows: int = 64  # sequences running at once
    max_seq_len: int | None = None  # positions one request may hold; None: the model's context
    kv_cache_memory: int | None = None  # bytes of KV pool; None: 1 GiB on CPU, a share on CUDA
    decode_lanes_memory: int | None = None  # bytes of decode lanes (contiguous copies of the
    #                                         decoding rows' KV); None: 384 MiB on CPU, 0 on CUDA
    block_size: int = 16  # positions per KV block
    step_token_budget: int | None = None  # tokens fed per step: decodes first, then prompt
    #                                        chunks; None: 112 on CPU, 2048 on CUDA
    prefix_cache: bool = True  # reuse the KV of cached full blocks of earlier prompts
    max_waiting: int = 1024  # queued requests beyond which submit raises QueueFullError
    seed: int | None = None  # sampling seed for requests without their own
    priority_step: float = DEFAULT_PRIORITY_STEP  # see waiting_queue.py; must be > 0
    limits: RequestLimits = field(default_factory=RequestLimits)
