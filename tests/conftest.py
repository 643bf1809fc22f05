"""Shared fixtures: the SmolLM2 tokenizer and model (converted once, cached), tiny random models."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import make_tiny_model

from treadle.worker.loader import LoadedModel, converted_gguf, embedded_gguf_path, load_model


@pytest.fixture(autouse=True)
def _unfreeze_gc() -> Iterator[None]:
    """An engine's start freezes the objects alive then (`gc_freeze.py`); give them back
    to the collector after each test, so engines of earlier tests do not pile up."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2 converted to a transformers folder (first run: ~25 s)."""
    return converted_gguf(embedded_gguf_path())


@pytest.fixture(scope="session")
def tokenizer(smol_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture
def tiny(tokenizer: Any) -> LoadedModel:
    """A fresh tiny model per test (an engine switches its attention implementation)."""
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The real SmolLM2-135M-Instruct, fp32 on CPU."""
    return load_model(None, device="cpu")


@pytest.fixture
async def served(tiny: LoadedModel) -> Any:
    """A real gRPC server on a free loopback port around an engine on the tiny model."""
    from e2e.served import start_served

    s = await start_served(tiny)
    yield s
    await s.stop()


@pytest.fixture
def workload(tmp_path: Path, tokenizer: Any) -> Any:
    """A five-request W1-shaped workload for the benchmark harness tests."""
    from bench_workload import small_workload

    return small_workload(tmp_path, tokenizer)
