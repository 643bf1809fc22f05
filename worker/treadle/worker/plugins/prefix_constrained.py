"""`prefix_constrained`: the output is one of a set of phrases, as with transformers'
`PrefixConstrainedLogitsProcessor` fed a trie of allowed continuations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan import RowInput
from .base import LogitsPlugin, PluginArgumentError, PluginContext, reject_unknown

MAX_SEQUENCES = 1024
MAX_PHRASE_CHARS = 1024
MAX_TOKENS = 16384  # all sequences together: the trie's size


@dataclass(slots=True)
class TrieNode:
    children: dict[int, TrieNode] = field(default_factory=dict)
    complete: bool = False  # a sequence ends here


@dataclass(frozen=True, slots=True)
class Trie:
    """The allowed token sequences; `allowed(prefix)` is what may follow `prefix`."""

    root: TrieNode
    eos: tuple[int, ...]

    @classmethod
    def of(cls, sequences: Sequence[Sequence[int]], eos: Sequence[int]) -> Trie:
        root = TrieNode()
        for seq in sequences:
            node = root
            for token in seq:
                node = node.children.setdefault(token, TrieNode())
            node.complete = True
        return cls(root, tuple(eos))

    def allowed(self, ids: Sequence[int], start: int = 0) -> list[int]:
        """The tokens that continue the prefix `ids[start:]` within some sequence, plus
        end-of-sequence where a sequence is complete; end-of-sequence alone once the
        prefix has left the trie. Reads at most the longest sequence's length of `ids`."""
        node = self.root
        for k in range(start, len(ids)):
            child = node.children.get(ids[k])
            if child is None:
                return list(self.eos)
            node = child
        return [*node.children, *(self.eos if node.complete else ())]


class PrefixConstrained(LogitsPlugin):
    """Constrain the generated tokens to one of a set of sequences.

    Arguments: `phrases` (strings, tokenised as given, without special tokens)
    and/or `token_ids` (lists of token ids); together 1 to 1024 sequences and at
    most 16,384 tokens. Each step a row may only choose a token that continues
    its generated tokens within some sequence, or end-of-sequence where one is
    complete (and once the output has left every sequence). As transformers'
    `PrefixConstrainedLogitsProcessor`: the allowed tokens keep their scores,
    every other gets -inf, and if every allowed token was already -inf they are
    given 0 so the constraint still holds.
    """

    name = "prefix_constrained"

    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> Trie:
        path = f"plugins[{self.name}]"
        reject_unknown(path, args, ("phrases", "token_ids"))
        phrases = args.get("phrases", [])
        ids = args.get("token_ids", [])
        if not isinstance(phrases, list) or not all(isinstance(p, str) and p for p in phrases):
            raise PluginArgumentError(f"{path}.phrases: must be a list of non-empty strings")
        if not isinstance(ids, list) or not all(
            isinstance(s, list) and s and all(_is_token(t, ctx.vocab_size) for t in s) for s in ids
        ):
            raise PluginArgumentError(
                f"{path}.token_ids: must be a list of non-empty lists of token ids "
                f"below {ctx.vocab_size}"
            )
        count = len(phrases) + len(ids)
        if not 1 <= count <= MAX_SEQUENCES:
            raise PluginArgumentError(
                f"{path}: 1 to {MAX_SEQUENCES} sequences (phrases and token_ids), got {count}"
            )
        if any(len(p) > MAX_PHRASE_CHARS for p in phrases):
            raise PluginArgumentError(
                f"{path}.phrases: each phrase at most {MAX_PHRASE_CHARS} characters"
            )
        sequences = [
            *(ctx.tokenizer.encode(p, add_special_tokens=False) for p in phrases),
            *ids,
        ]
        tokens = sum(len(s) for s in sequences)
        if tokens > MAX_TOKENS:
            raise PluginArgumentError(
                f"{path}: the sequences hold {tokens} tokens; the limit is {MAX_TOKENS}"
            )
        return Trie.of(sequences, ctx.eos_token_ids)

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        row_index: list[int] = []
        token_index: list[int] = []
        for i, (r, trie) in enumerate(zip(rows, states, strict=True)):
            assert isinstance(trie, Trie)
            allowed = trie.allowed(r.token_ids, r.prompt_len)
            row_index.extend([i] * len(allowed))
            token_index.extend(allowed)
        mask = torch.full_like(scores, float("-inf"))  # [n, V]
        mask[torch.tensor(row_index), torch.tensor(token_index)] = 0.0
        constrained = scores + mask
        unsatisfiable = constrained.amax(dim=-1, keepdim=True).isneginf()  # [n, 1]
        return torch.where(unsatisfiable, mask, constrained)


def _is_token(value: object, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size
