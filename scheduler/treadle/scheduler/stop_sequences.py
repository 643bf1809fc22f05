"""Stop token sequences matched on generated ids, with their text held back."""

from __future__ import annotations


class StopSequenceMatcher:
    """Finds the first stop token sequence in a stream of generated token ids.

    The text of the latest tokens that could still begin a sequence is held
    back, and released once they cannot; when a sequence completes, the text
    before it is released (plus the sequence's own text if `keep`) and the
    request stops. What it holds is shorter than the longest sequence, so a
    token costs the same at any length of output (as transformers'
    `StopStringCriteria` / the seed's `StopWordsCriteria` check only the tail).
    """

    def __init__(self, sequences: tuple[tuple[int, ...], ...], keep: bool = False) -> None:
        self.sequences = tuple(s for s in sequences if s)
        self.keep = keep
        self.ids: list[int] = []  # the latest ids, a proper prefix of some sequence
        self.texts: list[str] = []  # their text, held back

    def feed(self, token: int, text: str) -> tuple[str, bool]:
        """Add a generated token and its text; return (text to release now, whether a
        sequence just completed)."""
        if not self.sequences:
            return text, False
        self.ids.append(token)
        self.texts.append(text)
        for seq in self.sequences:
            if len(seq) <= len(self.ids) and tuple(self.ids[-len(seq) :]) == seq:
                cut = len(self.texts) - (0 if self.keep else len(seq))
                released = "".join(self.texts[:cut])
                self.ids, self.texts = [], []
                return released, True
        held = self._held()
        released = "".join(self.texts[: len(self.texts) - held])
        self.ids = self.ids[len(self.ids) - held :]
        self.texts = self.texts[len(self.texts) - held :]
        return released, False

    def flush(self) -> str:
        """Release whatever is held back (the request ended without a match)."""
        text = "".join(self.texts)
        self.ids, self.texts = [], []
        return text

    def _held(self) -> int:
        """Length of the longest suffix of `ids` that is a proper prefix of a sequence."""
        longest = 0
        for seq in self.sequences:
            for n in range(min(len(seq) - 1, len(self.ids)), longest, -1):
                if tuple(self.ids[-n:]) == seq[:n]:
                    longest = n
                    break
        return longest
