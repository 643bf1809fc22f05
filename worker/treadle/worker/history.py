"""A sequence's tokens and the statistics the processors read, kept incrementally.

Repetition, presence and frequency penalties and no-repeat n-grams depend on
a row's whole history. Re-reading the history every step would make a step
at token 8,000 cost hundreds of times one at token 10, so each statistic is
kept beside the token list and absorbs only the tokens appended since it was
last read (amortised O(1) per token):

- `seen_ids()`: the distinct ids of prompt + generated tokens (repetition
  penalty), at most the vocabulary however long the sequence;
- `generated_counts()`: each distinct generated id and how often it occurs
  (presence and frequency penalties);
- `ngram_bans(n)`: the tokens that would repeat an n-gram, looked up in a
  table from each (n-1)-gram to the tokens that followed it.

A statistic is built the first time a processor asks for it, so requests
that use none of them pay nothing. The history belongs to its request and
moves with it: it survives preemption, and `fork` gives each sample of a
request its own copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np


class TokenHistory:
    """The token ids of one sequence (prompt first) with incremental statistics.

    Only `append` adds tokens; `ids` must not be modified otherwise.
    """

    def __init__(self, ids: Iterable[int], prompt_len: int | None = None) -> None:
        self.ids: list[int] = list(ids)  # prompt + generated
        self.prompt_len = len(self.ids) if prompt_len is None else prompt_len
        self._seen: _DistinctIds | None = None
        self._counts: _Counts | None = None
        self._ngrams: dict[int, _NGramTable] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, token: int) -> None:
        self.ids.append(token)

    def seen_ids(self) -> np.ndarray:
        """The distinct ids of every token so far, prompt included: `[S]` int64 (a view,
        valid until the next call)."""
        if self._seen is None:
            self._seen = _DistinctIds()
        return self._seen.update(self.ids)

    def generated_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct generated ids `[G]` and their counts `[G]` (int64 views, valid
        until the next call)."""
        if self._counts is None:
            self._counts = _Counts(self.prompt_len)
        return self._counts.update(self.ids)

    def ngram_bans(self, size: int) -> Sequence[int]:
        """The tokens that would complete an n-gram of `size` tokens already in the
        sequence (as transformers' `NoRepeatNGramLogitsProcessor`)."""
        table = self._ngrams.get(size)
        if table is None:
            table = self._ngrams[size] = _NGramTable(size)
        return table.bans(self.ids)

    def fork(self) -> TokenHistory:
        """An independent copy (tokens and statistics), for another sample."""
        return copy.deepcopy(self)


class _Growing:
    """An int64 array that grows by doubling: `view()` is its filled part."""

    def __init__(self) -> None:
        self.data = np.empty(64, dtype=np.int64)
        self.size = 0

    def push(self, value: int) -> int:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.size] = value
        self.size += 1
        return self.size - 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class _DistinctIds:
    def __init__(self) -> None:
        self.members: set[int] = set()
        self.order = _Growing()
        self.absorbed = 0  # tokens of the history looked at

    def update(self, ids: list[int]) -> np.ndarray:
        for t in ids[self.absorbed :]:
            if t not in self.members:
                self.members.add(t)
                self.order.push(t)
        self.absorbed = len(ids)
        return self.order.view()


class _Counts:
    def __init__(self, start: int) -> None:
        self.slot: dict[int, int] = {}  # token id -> index in ids/counts
        self.ids = _Growing()
        self.counts = _Growing()
        self.absorbed = start  # the prompt is not counted

    def update(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        for t in ids[self.absorbed :]:
            at = self.slot.get(t)
            if at is None:
                self.slot[t] = self.ids.push(t)
                self.counts.push(1)
            else:
                self.counts.data[at] += 1
        self.absorbed = max(self.absorbed, len(ids))
        return self.ids.view(), self.counts.view()


class _NGramTable:
    def __init__(self, size: int) -> None:
        self.size = size
        self.follows: dict[tuple[int, ...], set[int]] = {}  # (n-1)-gram -> tokens after it
        self.absorbed = 0  # windows ending before this position are in the table

    def bans(self, ids: list[int]) -> Sequence[int]:
        n = self.size
        for end in range(max(self.absorbed, n - 1), len(ids)):  # window ids[end-n+1 : end+1]
            self.follows.setdefault(tuple(ids[end - n + 1 : end]), set()).add(ids[end])
        self.absorbed = len(ids)
        if len(ids) < n - 1:
            return ()
        return tuple(self.follows.get(tuple(ids[len(ids) - n + 1 :]), ()))
