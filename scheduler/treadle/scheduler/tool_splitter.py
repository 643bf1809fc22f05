"""Splitting a request's streamed text into its content and its tool calls."""

from __future__ import annotations

from ..api.tools import ToolCall
from .stop_strings import held_suffix
from .tool_format import OPEN, parse_calls


class ToolCallSplitter:
    """Releases the text before the first call's opening marker and keeps the rest.

    Text that could be the start of the marker is held back until the next delta
    tells; from the marker on nothing is released. When the request ends, the
    kept text is parsed into calls; what follows the last complete call (a call
    cut short by max_new_tokens, say) is released as text, so nothing is lost.
    """

    def __init__(self) -> None:
        self.pending = ""  # text received but not released: a possible marker start
        self.calls_text: str | None = None  # the output from the first marker on

    def feed(self, delta: str) -> str:
        """Add text; return the text to release now."""
        if self.calls_text is not None:
            self.calls_text += delta
            return ""
        text = self.pending + delta
        start = text.find(OPEN)
        if start >= 0:
            self.pending, self.calls_text = "", text[start:]
            return text[:start]
        held = held_suffix(text, (OPEN,))
        self.pending = text[len(text) - held :]
        return text[: len(text) - held]

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """At the end of the output: (text still to release, the calls made)."""
        if self.calls_text is None:
            text, self.pending = self.pending, ""
            return text, ()
        calls, end = parse_calls(self.calls_text)
        text, self.calls_text = self.calls_text[end:], None
        return text, calls
