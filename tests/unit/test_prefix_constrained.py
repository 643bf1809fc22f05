"""The `prefix_constrained` plugin: greedy output equals transformers' `generate` with
`prefix_allowed_tokens_fn` over the same trie, for every request of a mixed batch."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import run_checked, standard_attention

from treadle.api.outcome import FinishReason
from treadle.api.params import PluginRequest
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.generation_request import GenerationRequest
from treadle.worker.loader import LoadedModel
from treadle.worker.plugins import PluginArgumentError, PluginContext, default_registry
from treadle.worker.plugins.prefix_constrained import Trie

PHRASES = ["New York", "New Orleans", "Newcastle upon Tyne", "Boston"]
EOS = 2


def generate_with_trie(tiny: LoadedModel, prompt: list[int], trie: Trie, max_new: int) -> list[int]:
    """transformers' own generate with a PrefixConstrainedLogitsProcessor over `trie`."""
    config = copy.deepcopy(tiny.model.generation_config)
    config.eos_token_id, config.pad_token_id = EOS, EOS

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return trie.allowed(sent.tolist(), len(prompt))

    with standard_attention(tiny.model), torch.inference_mode():
        out = tiny.model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=config,
            max_new_tokens=max_new,
            do_sample=False,
            prefix_allowed_tokens_fn=allowed,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def test_greedy_output_equals_generate_with_the_same_trie(tiny: LoadedModel) -> None:
    ctx = PluginContext(tiny.tokenizer, tiny.vocab_size, (EOS,))
    args: dict[str, Any] = {"phrases": PHRASES, "token_ids": [[100, 200, 300], [100, 201]]}
    trie = default_registry().bind("prefix_constrained", args, ctx).state
    assert isinstance(trie, Trie)
    engine = Engine(tiny, EngineConfig(max_batch_rows=8, max_seq_len=128, block_size=4))
    prompts = [[5 + i, 60 + 7 * i, 900 + i] for i in range(6)]
    gens = [
        GenerationRequest(
            prompt_token_ids=p,
            request_id=f"c{i}",
            max_new_tokens=12,
            plugins=[PluginRequest("prefix_constrained", args)],
        )
        for i, p in enumerate(prompts)
    ]
    gens.append(GenerationRequest(prompt_token_ids=[7, 8], request_id="free", max_new_tokens=5))
    got, _ = run_checked(engine, gens)
    sequences = {tuple(tiny.tokenizer.encode(p, add_special_tokens=False)) for p in PHRASES}
    sequences |= {(100, 200, 300), (100, 201)}
    for i, prompt in enumerate(prompts):
        out = got[f"c{i}"]
        want = generate_with_trie(tiny, prompt, trie, 12)
        assert out.tokens == want, i
        assert out.finish.reason is FinishReason.EOS
        assert tuple(out.tokens[:-1]) in sequences  # one whole sequence, then EOS
    assert len(got["free"].tokens) == 5  # the unconstrained row beside them is free


def test_the_trie_allows_continuations_then_eos() -> None:
    trie = Trie.of([[1, 2, 3], [1, 2], [4]], eos=[0])
    assert sorted(trie.allowed([])) == [1, 4]
    assert trie.allowed([1]) == [2]
    assert sorted(trie.allowed([1, 2])) == [0, 3]  # complete, or go on
    assert trie.allowed([1, 2, 3]) == [0]
    assert trie.allowed([9]) == [0]  # off the trie: end
    assert trie.allowed([7, 7, 1], start=2) == [2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, r"1 to 1024 sequences"),
        ({"phrases": ["ok", ""]}, r"phrases: must be a list of non-empty strings"),
        ({"token_ids": [[1, 10**9]]}, r"token_ids: must be a list of non-empty lists"),
        ({"token_ids": [[]]}, r"token_ids: must be"),
        ({"phrases": ["a"], "bias": 1}, r"unknown argument 'bias'"),
        ({"token_ids": [[1] * 9000, [2] * 9000]}, r"hold 18000 tokens; the limit is 16384"),
    ],
)
def test_bad_arguments_are_refused_naming_them(
    tiny: LoadedModel, args: dict[str, Any], message: str
) -> None:
    ctx = PluginContext(tiny.tokenizer, tiny.vocab_size, (EOS,))
    with pytest.raises(PluginArgumentError, match=rf"plugins\[prefix_constrained\].*{message}"):
        default_registry().bind("prefix_constrained", args, ctx)
