"""Structured output: a request's `response_format` compiled to a grammar, and its state.

treadle constrains decoding with llguidance (chosen over xgrammar by measuring on
the CPU: bench/grammar_libs.py, docs/structured-output.md). A `ResponseFormat` is
turned into an llguidance grammar and compiled once per grammar text into a
matcher kept in a bounded cache (`GrammarCompiler`); every sequence that uses it
gets its own copy of that matcher (`GrammarState`), which the worker advances by
each chosen token (`grammar_mask.py`). The state belongs to the request: it
survives preemption (the generated tokens are kept, and so is their state) and
each sample of a request has its own.

Compiling runs where requests are validated, off the event loop and off the
step thread; the first mask is computed there too, because llguidance builds
its lexer lazily on it. llguidance is imported on first use, so a server
whose environment lacks it still serves unconstrained requests
(`GrammarCompiler.available`).
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..api.params import RESPONSE_FORMAT_TYPES, ResponseFormat

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON output may be pretty-printed, but whitespace between two tokens of JSON is bounded,
# so a model cannot spend its whole budget on spaces (llguidance's default is unbounded).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
CACHE_ENTRIES = 256  # compiled grammars kept (least recently used dropped first)


class GrammarError(ValueError):
    """A format that cannot be compiled, or one over a limit; `str()` says why."""


class GrammarState:
    """One sequence's position in its grammar: an llguidance matcher of its own."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher  # llguidance.LLMatcher

    def fork(self) -> GrammarState:
        """An independent copy at the same position (a sample of the same request)."""
        return GrammarState(self.matcher.deep_copy())

    @property
    def is_stopped(self) -> bool:
        """The output is complete: nothing but end-of-sequence may follow."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a token it refused, a parser limit), or None."""
        return reason(str(self.matcher.get_error())) if self.matcher.is_error() else None


def available() -> bool:
    """Whether the llguidance package is installed (structured output can be served)."""
    return importlib.util.find_spec("llguidance") is not None


def grammar_text(fmt: ResponseFormat) -> str:
    """The llguidance grammar of `fmt` (not compiled yet). Raises GrammarError for a
    JSON Schema that is not a JSON object."""
    import llguidance

    options: JsonCompileOptions = {"whitespace_pattern": JSON_WHITESPACE}
    if fmt.type == "json_schema":
        try:
            schema = json.loads(fmt.value)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"json_schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise GrammarError("json_schema must be a JSON object")
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options))
    if fmt.type == "json_object":
        return str(
            llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=options)
        )
    if fmt.type == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(fmt.value))
    if fmt.type == "grammar":
        return str(llguidance.LLMatcher.grammar_from_lark(fmt.value))
    if fmt.type == "choice":
        lark = "start: " + " | ".join(json.dumps(c) for c in fmt.choices)
        return str(llguidance.LLMatcher.grammar_from_lark(lark))
    raise GrammarError(f"type {fmt.type!r} is not one of {', '.join(RESPONSE_FORMAT_TYPES)}")


class GrammarCompiler:
    """Compiles formats for one model's tokenizer; thread-safe (validation threads).

    Compiled matchers are cached by grammar text, so a popular schema is compiled
    once; formats refused for taking too long are remembered too, so retrying
    one costs nothing. The llguidance tokenizer is built on first use.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        compile_seconds: float,
        entries: int = CACHE_ENTRIES,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._compile_seconds = compile_seconds
        self._entries = entries
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()  # grammar text -> template matcher
        self._refused: OrderedDict[str, str] = OrderedDict()  # grammar text -> why

    @property
    def available(self) -> bool:
        return available()

    def state(self, fmt: ResponseFormat) -> GrammarState:
        """A fresh state of `fmt`'s grammar. Raises GrammarError naming what is wrong."""
        if not available():
            raise GrammarError("structured output needs the llguidance package on the server")
        text = grammar_text(fmt)
        template = self._cached(text)
        if template is None:
            template = self._compile(text)
        return GrammarState(template.deep_copy())

    def _cached(self, text: str) -> Any:
        with self._lock:
            if text in self._refused:
                raise GrammarError(self._refused[text])
            template = self._cache.get(text)
            if template is not None:
                self._cache.move_to_end(text)
            return template

    def _compile(self, text: str) -> Any:
        import llguidance

        tokenizer = self._llg_tokenizer()
        started = time.perf_counter()
        limits = llguidance.LLParserLimits(verbose_errors=False)  # no parser dumps in errors
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0, limits=limits)
        if not matcher.is_error():
            matcher.compute_bitmask()  # builds the lexer: here, not on the step thread
        seconds = time.perf_counter() - started
        if matcher.is_error():
            raise GrammarError(reason(str(matcher.get_error())))
        if seconds > self._compile_seconds:
            why = f"took {seconds:.1f} s to compile; the limit is {self._compile_seconds:g} s"
            self._remember(self._refused, text, why)
            raise GrammarError(why)
        self._remember(self._cache, text, matcher)
        return matcher

    def _remember(self, table: OrderedDict[str, Any], text: str, value: Any) -> None:
        with self._lock:
            table[text] = value
            table.move_to_end(text)
            while len(table) > self._entries:
                table.popitem(last=False)

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos
                )
            return self._tokenizer


MAX_REASON_CHARS = 300


def reason(message: str) -> str:
    """llguidance's error on one line (its parts joined), at most MAX_REASON_CHARS: it is
    echoed to the client, and a grammar's own text may be long."""
    reason = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return reason or "the grammar is invalid"
