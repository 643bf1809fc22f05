"""Stop strings matched on streamed text, across token boundaries, with hold-back."""

from __future__ import annotations


class StopStringMatcher:
    """Finds the first stop string in a stream of text deltas.

    Text that could still be the beginning of a stop string is held back and
    never released until it is known not to be one; when a stop string
    appears, the text before it is released (plus the string itself if
    `keep`) and the rest is dropped.
    """

    def __init__(self, stops: tuple[str, ...], keep: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.keep = keep
        self.pending = ""  # text received but not released

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Add text; return (text to release now, the matched stop string or None)."""
        if not self.stops:
            return delta, None
        text = self.pending + delta
        match = self._first_match(text)
        if match is not None:
            index, stop = match
            self.pending = ""
            return text[: index + (len(stop) if self.keep else 0)], stop
        held = held_suffix(text, self.stops)
        self.pending = text[len(text) - held :] if held else ""
        return text[: len(text) - held], None

    def flush(self) -> str:
        """Release whatever is held back (the request ended without a match)."""
        text, self.pending = self.pending, ""
        return text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            index = text.find(stop)
            if index < 0:
                continue
            if best is None or index < best[0] or (index == best[0] and len(stop) > len(best[1])):
                best = (index, stop)
        return best


def held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of
    `markers`: text that must be held back until the next delta tells."""
    longest = 0
    last = text[-1:]  # a candidate prefix must end with the text's last character
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker[n - 1] == last and text.endswith(marker[:n]):
                longest = n
                break
    return longest
