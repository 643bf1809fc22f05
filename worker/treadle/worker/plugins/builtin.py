"""The built-in plugins: `phrase_boost` (a batch-aware LogitsPlugin) and
`confidence_stop` (a plain transformers StoppingCriteria, registered through
the adapter to show how one is written)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria

from ..error_text import shown
from ..plan import RowInput
from .base import LogitsPlugin, PluginArgumentError, PluginContext, reject_unknown

MAX_PHRASES = 64
MAX_PHRASE_CHARS = 256
MAX_PHRASE_TOKENS = 1024  # all phrase variants together: the per-step work is linear in it
MAX_BIAS = 100.0


@dataclass(frozen=True, slots=True)
class PhraseSequence:
    """One phrase variant's token ids and their prefix function (KMP)."""

    ids: tuple[int, ...]
    borders: tuple[int, ...]  # borders[i]: longest proper prefix of ids[: i + 1] that ends it

    @classmethod
    def of(cls, ids: tuple[int, ...]) -> PhraseSequence:
        borders = [0] * len(ids)
        k = 0
        for i in range(1, len(ids)):
            while k and ids[i] != ids[k]:
                k = borders[k - 1]
            if ids[i] == ids[k]:
                k += 1
            borders[i] = k
        return cls(ids, tuple(borders))

    def continuations(self, token_ids: Sequence[int]) -> set[int]:
        """`ids[done]` for every `0 < done < len(ids)` where `ids[:done]` ends `token_ids`.

        One pass of the KMP automaton over the last `len(ids) - 1` tokens, then
        the chain of borders: O(len(ids)) per call, whatever `token_ids` holds.
        """
        n = len(self.ids)
        matched = 0
        for t in token_ids[max(0, len(token_ids) - (n - 1)) :]:
            if matched == n:
                matched = self.borders[matched - 1]
            while matched and self.ids[matched] != t:
                matched = self.borders[matched - 1]
            if self.ids[matched] == t:
                matched += 1
        found: set[int] = set()
        while matched:
            if matched < n:
                found.add(self.ids[matched])
            matched = self.borders[matched - 1]
        return found


@dataclass(frozen=True, slots=True)
class PhraseBoostState:
    """One request's phrases, tokenised, and its bias."""

    sequences: tuple[PhraseSequence, ...]  # every phrase variant
    bias: float

    def boosted(self, token_ids: Sequence[int]) -> set[int]:
        """The tokens to boost after `token_ids`: every phrase's first token, and the
        next token of every phrase whose beginning ends `token_ids` (linear in the
        phrases' total length)."""
        boosted = {s.ids[0] for s in self.sequences}
        for seq in self.sequences:
            boosted |= seq.continuations(token_ids)
        return boosted


class PhraseBoost(LogitsPlugin):
    """Encourage phrases: each step, add `bias` to the first token of every phrase
    and to the next token of any phrase already begun at the end of the row.

    Arguments: `phrases` (1 to 64 non-empty strings of at most 256
    characters, at most 1024 tokens in all once tokenised, variants
    included), `bias` (a number within [-100, 100], default 2.0). Each
    phrase is tokenised as given and with a leading space, so that it also
    matches in the middle of a sentence. A token is boosted once per step
    however many phrases ask for it; the work per step is linear in the
    phrases' tokens.
    """

    name = "phrase_boost"

    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> PhraseBoostState:
        path = f"plugins[{self.name}]"
        reject_unknown(path, args, ("phrases", "bias"))
        phrases = args.get("phrases")
        if (
            not isinstance(phrases, list | tuple)
            or not phrases
            or not all(isinstance(p, str) and p.strip() for p in phrases)
        ):
            raise PluginArgumentError(
                f"{path}.phrases: must be a non-empty list of non-empty strings"
            )
        if any(len(p) > MAX_PHRASE_CHARS for p in phrases):
            raise PluginArgumentError(
                f"{path}.phrases: each phrase at most {MAX_PHRASE_CHARS} characters"
            )
        if len(phrases) > MAX_PHRASES:
            raise PluginArgumentError(
                f"{path}.phrases: at most {MAX_PHRASES} phrases, got {len(phrases)}"
            )
        bias = args.get("bias", 2.0)
        if (
            isinstance(bias, bool)
            or not isinstance(bias, int | float)
            or not math.isfinite(bias)
            or abs(bias) > MAX_BIAS
        ):
            raise PluginArgumentError(
                f"{path}.bias: must be a number within [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                f"got {shown(bias)}"
            )
        sequences: dict[tuple[int, ...], None] = {}
        for phrase in phrases:
            for variant in (phrase, " " + phrase.lstrip()):
                ids = tuple(ctx.tokenizer.encode(variant, add_special_tokens=False))
                if ids and all(0 <= t < ctx.vocab_size for t in ids):
                    sequences[ids] = None
        if not sequences:
            raise PluginArgumentError(f"{path}.phrases: no phrase has tokens in the vocabulary")
        total = sum(len(ids) for ids in sequences)
        if total > MAX_PHRASE_TOKENS:
            raise PluginArgumentError(
                f"{path}.phrases: {total} tokens in all (each phrase as given and after a "
                f"space); the limit is {MAX_PHRASE_TOKENS}"
            )
        return PhraseBoostState(tuple(map(PhraseSequence.of, sequences)), float(bias))

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        row_ids: list[int] = []
        token_ids: list[int] = []
        biases: list[float] = []
        for i, (row, state) in enumerate(zip(rows, states, strict=True)):
            if not isinstance(state, PhraseBoostState):
                raise TypeError(f"phrase_boost: state {state!r} was not made by its bind()")
            boosted = state.boosted(row.token_ids)
            row_ids.extend([i] * len(boosted))
            token_ids.extend(boosted)
            biases.extend([state.bias] * len(boosted))
        at = (
            torch.tensor(row_ids, dtype=torch.long, device=scores.device),  # [K]
            torch.tensor(token_ids, dtype=torch.long, device=scores.device),  # [K]
        )
        scores.index_put_(
            at, torch.tensor(biases, dtype=scores.dtype, device=scores.device), accumulate=True
        )
        return scores


class ConfidenceStop(StoppingCriteria):
    """Stop once each of the last `window` chosen tokens had probability below `threshold`.

    A plain `transformers.StoppingCriteria`: the registry's adapter makes one
    instance per request (which keeps the running count) and calls it per
    row with the row's tokens, the chosen one last, and its processed scores.
    Arguments: `threshold` in (0, 1), `window` an integer >= 1 (default 4).
    """

    def __init__(self, threshold: float, window: int = 4) -> None:
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0 < threshold < 1
        ):
            raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 1024:
            raise ValueError(f"window must be an integer within [1, 1024], got {window!r}")
        self.threshold = float(threshold)
        self.window = window
        self.low_in_a_row = 0  # consecutive chosen tokens below the threshold so far

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """`input_ids` `[1, L]` ending with the chosen token, `scores` `[1, V]` -> `[1]` bool."""
        if input_ids.shape[0] != 1:
            raise ValueError("confidence_stop keeps one request's state: call it with one row")
        probs = torch.softmax(scores.float(), dim=-1)  # [1, V]
        chosen = float(probs[0, input_ids[0, -1]])
        self.low_in_a_row = self.low_in_a_row + 1 if chosen < self.threshold else 0
        return torch.tensor([self.low_in_a_row >= self.window], device=input_ids.device)
