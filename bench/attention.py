"""Running the peers with transformers' own attention on a model an engine may have switched."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def standard_attention(model: Any, implementation: str = "sdpa") -> Iterator[Any]:
    """Switch `model` to transformers' `implementation` inside the block, then back.

    A treadle engine switches the model to its own slot attention when it is
    built; `generate`, transformers' continuous batching and the bare forward
    need a standard one.
    """
    text = model.config.get_text_config()  # a vision-language model's: the one treadle switches
    vision = getattr(model.config, "vision_config", None) is not None
    saved = text._attn_implementation
    if saved != implementation:
        model.set_attn_implementation({"text_config": implementation} if vision else implementation)
    try:
        yield model
    finally:
        if text._attn_implementation != saved:
            model.set_attn_implementation({"text_config": saved} if vision else saved)


@contextlib.contextmanager
def quiet_generation_warnings() -> Iterator[None]:
    """Silence `generate`'s per-call warning about `eos_token_id=-1` (our way to ignore EOS)."""
    logger = logging.getLogger("transformers.generation.utils")
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)
