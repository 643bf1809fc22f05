"""Shared fixtures: the SmolLM2 tokenizer and model (converted once, cached), tiny random models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from treadle.worker.loader import LoadedModel, converted_gguf, embedded_gguf_path, load_model


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2 converted to a transformers folder (first run: ~25 s)."""
    return converted_gguf(embedded_gguf_path())


@pytest.fixture(scope="session")
def tokenizer(smol_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def make_tiny_model(tokenizer: Any, seed: int = 0, layers: int = 2) -> LoadedModel:
    """A tiny random llama over SmolLM2's vocabulary; seeded, so deterministic.

    The large init spreads the logits so greedy choices are not near-ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name="tiny-llama",
        context_length=512,
        eos_token_ids=(2,),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


@pytest.fixture
def tiny(tokenizer: Any) -> LoadedModel:
    """A fresh tiny model per test (an engine switches its attention implementation)."""
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The real SmolLM2-135M-Instruct, fp32 on CPU."""
    return load_model(None, device="cpu")


class standard_attention:
    """Run `model` with transformers' own sdpa attention inside the block (for references)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.saved = model.config._attn_implementation

    def __enter__(self) -> Any:
        self.model.set_attn_implementation("sdpa")
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(self.saved)
