"""Fixtures of the deployment tests: rendered kustomizations, tiny model folders."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from deploy.support import Rendered, render_variant
from helpers import make_tiny_model


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """`rendered("cpu")`: the manifests of a variant (see support.VARIANTS), rendered once."""
    scratch = tmp_path_factory.mktemp("kustomize")
    cache: dict[str, list[dict[str, Any]]] = {}

    def get(name: str) -> list[dict[str, Any]]:
        if name not in cache:
            cache[name] = render_variant(name, scratch)
        return copy.deepcopy(cache[name])

    return get


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> list[Path]:
    """Two tiny random models saved as transformers folders; different seeds, so their greedy
    outputs differ and tell which server produced a result."""
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for seed in (0, 1):
        loaded = make_tiny_model(tokenizer, seed=seed)
        loaded.model.save_pretrained(root / f"tiny-{seed}")
        tokenizer.save_pretrained(root / f"tiny-{seed}")
        dirs.append(root / f"tiny-{seed}")
    return dirs
