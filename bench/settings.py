"""Every knob of a W1 run; the defaults are the standard workload of DESIGN.md section 6."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from treadle.scheduler.engine_config import EngineConfig

RUN_KEYS = (
    "ceiling_before",
    "treadle",
    "generate_single",
    "generate_static",
    "transformers_cb",
    "ceiling",
)


@dataclass(frozen=True)
class W1Settings:
    requests: int | None = None  # first N requests of the workload; None: all
    skip: frozenset[str] = frozenset()  # run keys (RUN_KEYS) not to run
    warmup: bool = True  # one short untimed call before each timed run
    # how the model was loaded (ceiling_before loads it again in a process of its own)
    model: str | None = None  # the load_model spec; None: the embedded SmolLM2
    device: str | None = None
    threads: int | None = None  # torch threads; None: torch's own
    # treadle
    clients: int = 64  # closed-loop clients
    max_batch_rows: int = 64
    max_seq_len: int = 256  # positions one request may hold; W1 needs at most 55 + 128
    # Tokens fed per step, decodes first: 64 decodes leave 448 for prompts, 8 or more of W1's
    # (35-55 tokens) a step, about what the old 512-token prefill budget admitted.
    step_token_budget: int = 512
    kv_cache_memory: int | None = None  # bytes of KV pool; None: the engine's default
    decode_lanes_memory: int | None = None  # bytes of decode lanes; None: the engine's default
    prefix_cache: bool = True
    # peers
    single_requests: int = 16  # generate_single runs the first N requests
    static_batch: int = 64  # rows of a generate_static batch
    cb_num_blocks: int | None = None  # transformers_cb paged-cache blocks; None: its default
    cb_max_batch_tokens: int | None = None  # transformers_cb tokens per step; None: its default
    # ceiling (before treadle, in its own process, and after the peers)
    ceiling_batch: int = 64
    ceiling_steps: int = 30
    ceiling_warmup: int = 2

    def __post_init__(self) -> None:
        unknown = self.skip - set(RUN_KEYS)
        if unknown:
            raise ValueError(f"skip: unknown runs {sorted(unknown)}; choose from {RUN_KEYS}")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch_rows=self.max_batch_rows,
            max_seq_len=self.max_seq_len,
            kv_cache_memory=self.kv_cache_memory,
            decode_lanes_memory=self.decode_lanes_memory,
            step_token_budget=self.step_token_budget,
            prefix_cache=self.prefix_cache,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: these settings and the full engine config they give."""
        out = dataclasses.asdict(self)
        out["skip"] = sorted(self.skip)
        out["engine"] = dataclasses.asdict(self.engine_config())
        return out
