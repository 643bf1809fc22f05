"""Incremental detokenization of a request's generated tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    Built on `tokenizers.decoders.DecodeStream`: a character split over
    several tokens (UTF-8 bytes, byte fallback) is released only once whole,
    spaces are neither lost nor doubled (the prompt's tail seeds the stream,
    so a leading space is decoded in context), and special tokens are
    skipped unless asked.
    """

    _CONTEXT = 8  # prompt tokens that seed the stream

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(
            ids=list(prompt_ids[-self._CONTEXT :]), skip_special_tokens=skip_special_tokens
        )

    def step(self, token_id: int) -> str:
        """Return the text that `token_id` completes ("" while a character is incomplete)."""
        return self._stream.step(self._backend, token_id) or ""
