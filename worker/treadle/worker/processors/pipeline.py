"""The logits pipeline: every request's processors, plugins and warpers, for a whole batch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..params import SamplingParams
from ..plan import RowInput
from ..plugins.runner import has_logits_plugins, run_logits_plugins
from .batch import StepBatch
from .bias import apply_logit_bias
from .compact import PackedScores
from .masks import (
    apply_allowed_tokens,
    apply_bad_words,
    apply_min_new_tokens,
    min_new_tokens_active,
)
from .ngram import apply_no_repeat_ngram
from .penalties import apply_presence_frequency, apply_repetition_penalty
from .rows import apply_to_rows
from .truncation import apply_top_p, apply_typical_p
from .warpers import apply_min_p, apply_temperature, apply_top_k

# A processor: which rows enable it, and how it rewrites those rows of the [N, V] scores.
Enabled = Callable[[RowInput], bool]
Processor = Callable[[torch.Tensor, StepBatch, Sequence[int]], torch.Tensor]

# transformers' order (GenerationMixin._get_logits_processor); presence/frequency,
# which transformers lacks, right after the repetition penalty.
PROCESSORS: tuple[tuple[Enabled, Processor], ...] = (
    (lambda r: bool(r.params.logit_bias), apply_logit_bias),
    (lambda r: r.params.repetition_penalty != 1.0, apply_repetition_penalty),
    (
        lambda r: r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0,
        apply_presence_frequency,
    ),
    (lambda r: r.params.no_repeat_ngram_size > 0, apply_no_repeat_ngram),
    (lambda r: bool(r.params.bad_words_ids), apply_bad_words),
    (min_new_tokens_active, apply_min_new_tokens),
    (lambda r: bool(r.params.allowed_token_ids), apply_allowed_tokens),
)

# A warper: which sampling rows enable it, and how it rewrites the scores [n, W] of
# exactly those rows (given their params). Only for rows with temperature > 0.
Wants = Callable[[SamplingParams], bool]


class Warper(Protocol):
    def __call__(self, scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor: ...


# transformers' order; the scores are packed (compact.py) where it pays.
WARPERS: tuple[tuple[Wants, Warper], ...] = (
    (lambda p: p.temperature != 1.0, apply_temperature),
    (lambda p: p.top_k > 0, apply_top_k),
    (lambda p: p.top_p < 1.0, apply_top_p),
    (lambda p: p.min_p > 0.0, apply_min_p),
    (lambda p: p.typical_p < 1.0, apply_typical_p),
)
PACK_AFTER_TOP_K = 2  # index in WARPERS right after top-k


@dataclass(slots=True)
class ProcessedLogits:
    """What the pipeline made of a batch's logits."""

    scores: torch.Tensor  # [N, V] after processors, plugins and (sampling rows only) warpers
    errors: dict[int, str]  # row index -> message, for rows whose plugin raised


class LogitsPipeline:
    """Applies each row's own logits processing to a batch of logits.

    Per row, in transformers' order: logit_bias, repetition_penalty,
    presence/frequency penalty, no_repeat_ngram_size, bad_words_ids,
    min_new_tokens, allowed_token_ids, then the request's `LogitsPlugin`s,
    then, only for sampling rows (temperature > 0), temperature, top_k,
    top_p, min_p and typical_p. Each built-in stage runs once per step on
    the rows that enable it, with per-row parameter tensors; a stage no row
    enables costs nothing, and a batch that enables nothing gets its logits
    back untouched (the same tensor, not a copy).

    A plugin that raises fails only the rows it was called for; they are
    reported in `ProcessedLogits.errors` and the call never raises for them.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # width of the logits rows

    def __call__(self, logits: torch.Tensor, rows: Sequence[RowInput]) -> ProcessedLogits:
        """Process `logits` `[N, V]`, row i belonging to `rows[i]`; may modify `logits` in place."""
        if logits.dim() != 2 or logits.shape[0] != len(rows) or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} for {len(rows)} rows "
                f"of vocabulary width {self.vocab_size}"
            )
        scores = _process(logits, StepBatch(rows, logits.device))
        errors: dict[int, str] = {}
        if has_logits_plugins(rows):
            errors = run_logits_plugins(scores, rows)
        scores = _warp(scores, rows)
        return ProcessedLogits(scores, errors)


def _process(scores: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    for enabled, processor in PROCESSORS:
        idx = [i for i, r in enumerate(batch.rows) if enabled(r)]
        if idx:
            scores = processor(scores, batch, idx)
    return scores


def _warp(scores: torch.Tensor, rows: Sequence[RowInput]) -> torch.Tensor:
    sampling = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    params = [rows[i].params for i in sampling]
    wanted = [[j for j, p in enumerate(params) if wants(p)] for wants, _ in WARPERS]
    if not any(wanted):
        return scores

    # Rows are likely narrow enough to pack after top-k when each has top-k or an
    # allowed list. (Packing costs ~4 passes over the scores; top-k packs for free.)
    narrow = all(p.allowed_token_ids or p.top_k > 0 for p in params)
    pack_at = PACK_AFTER_TOP_K if narrow else None

    def warp(sub: torch.Tensor) -> torch.Tensor:  # [n, V] the sampling rows
        packed: PackedScores | None = None
        for k, ((_, warper), idx) in enumerate(zip(WARPERS, wanted, strict=True)):
            if k == pack_at and packed is None and any(wanted[k:]):
                packed = PackedScores.pack(sub)
                sub = packed.values if packed is not None else sub  # [n, K] or [n, V]
            if not idx:
                continue
            chosen = [params[j] for j in idx]
            fuse = warper is apply_top_k and packed is None and len(idx) == len(params)
            if fuse and any(wanted[k + 1 :]):
                packed = PackedScores.top_k(sub, [p.top_k for p in chosen])
                if packed is not None:  # top-k done, and packed on the way
                    sub = packed.values  # [n, kmax]
                    continue
            sub = apply_to_rows(sub, idx, functools.partial(warper, params=chosen))
        return packed.unpack(sub) if packed is not None else sub

    return apply_to_rows(scores, sampling, warp)
