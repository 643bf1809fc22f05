"""The step's grammar stage: every constrained row's token mask, in one batch.

Runs after the logits processors and plugins and before the warpers: the
masks of all rows with a `GrammarState` are filled by llguidance in one
parallel call into one bitmask `[m, ceil(V/32)]` (bit j of word w: token
32w+j), unpacked and applied to those rows' scores in one masked fill; after
the choice, every state is advanced by its row's token in one parallel call.
A row whose output is complete (only end-of-sequence may follow) is given
end-of-sequence whatever the processors did to it, so it ends as a request
ends on EOS. Rows without a grammar cost nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .grammar import reason
from .plan import RowInput

if TYPE_CHECKING:
    from llguidance import LLExecutor


class GrammarMasker:
    """Applies and advances the grammar states of a step's rows (step thread only)."""

    def __init__(self, vocab_size: int, threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)  # int32 words per row of the bitmask
        self._threads = threads
        self._executor: LLExecutor | None = None  # made on first use

    def apply(self, scores: torch.Tensor, rows: Sequence[RowInput]) -> dict[int, str]:
        """Mask `scores` `[N, V]` in place for the rows with a grammar; returns the errors
        of rows that cannot go on (their grammar failed, or nothing is left allowed)."""
        constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        if not constrained:
            return {}
        import llguidance.numpy

        states = [s for _, s in constrained]
        bitmask = np.full((len(states), self.words), -1, dtype=np.int32)  # [m, W]
        matchers = [(s.matcher, j) for j, s in enumerate(states)]
        llguidance.numpy.fill_next_token_bitmask_par(self._llg_executor(), matchers, bitmask)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")  # [m, 32W]
        blocked = torch.from_numpy(bits[:, : self.vocab_size]).to(scores.device) == 0  # [m, V]
        whole = len(states) == scores.shape[0]
        index = torch.tensor([i for i, _ in constrained], device=scores.device)  # [m]
        masked = scores if whole else scores.index_select(0, index)  # [m, V]
        masked.masked_fill_(blocked, float("-inf"))
        stopped = [j for j, s in enumerate(states) if s.is_stopped]
        if stopped:  # complete: end-of-sequence only, whatever min_new_tokens etc. said
            done = torch.tensor(stopped, device=scores.device)
            masked[done] = torch.where(blocked[done], float("-inf"), 0.0)
        empty = masked.amax(dim=-1) == float("-inf")  # [m]: nothing left to choose
        if bool(empty.any()):  # those rows fail below; keep the choice defined meanwhile
            masked[empty] = 0.0
        if not whole:
            scores.index_copy_(0, index, masked)
        errors: dict[int, str] = {}
        for j, (i, s) in enumerate(constrained):
            why = s.error
            if why is None and bool(empty[j]):
                why = (
                    "no possible next token: the format and the request's other settings allow none"
                )
            if why is not None:
                errors[i] = f"response_format: {why}"
        return errors

    def advance(
        self, rows: Sequence[RowInput], tokens: Sequence[int], failed: Collection[int] = ()
    ) -> dict[int, str]:
        """Advance each constrained row's state by its chosen token (rows in `failed`, which
        end with an error anyway, are left alone); returns errors."""
        pairs = [
            (i, r.grammar.matcher, t)
            for i, (r, t) in enumerate(zip(rows, tokens, strict=True))
            if r.grammar is not None and t >= 0 and i not in failed
        ]
        if not pairs:
            return {}
        import llguidance.numpy

        accepted = llguidance.numpy.consume_token_par(
            self._llg_executor(), [(m, t) for _, m, t in pairs]
        )
        errors = {}
        for (i, matcher, token), ok in zip(pairs, accepted, strict=True):
            if not ok:  # the mask allowed it: llguidance disagrees with itself (seen, rarely)
                why = reason(str(matcher.get_error()))
                errors[i] = f"response_format: the grammar refused token {token} it allowed: {why}"
        return errors

    def _llg_executor(self) -> LLExecutor:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor(num_threads=self._threads)
        return self._executor
