"""JSON from untrusted clients, parsed only after its size and nesting are known to be bounded."""

from __future__ import annotations

import json
import math
from typing import Any

MAX_NUMBER_CHARS = 64  # digits of one JSON number; a longer one is refused, not parsed


class JsonLimitError(ValueError):
    """The text is over a limit or not strict JSON; `str()` says which, for a client."""


def loads_bounded(text: str, max_bytes: int, max_depth: int) -> Any:
    """Parse `text` as strict JSON: at most `max_bytes` UTF-8 bytes, arrays and objects
    nested at most `max_depth` deep, finite numbers of at most MAX_NUMBER_CHARS
    characters (no NaN or Infinity). Raises JsonLimitError.

    Size and depth are checked by a linear scan before anything is parsed, so a
    hostile document costs one pass over at most `max_bytes`.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise JsonLimitError(f"is {size} bytes; the limit is {max_bytes}")
    depth = _nesting(text)
    if depth > max_depth:
        raise JsonLimitError(f"is nested {depth} deep; the limit is {max_depth}")
    try:
        return json.loads(
            text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_no_constant
        )
    except JsonLimitError:
        raise
    except ValueError as exc:  # JSONDecodeError included
        raise JsonLimitError(f"is not JSON: {exc}") from exc


def _nesting(text: str) -> int:
    """Deepest nesting of [ and { outside strings, in one pass (strings end at an
    unescaped quote, as JSON's do; an unterminated one hides what follows it, which
    the parser refuses anyway)."""
    deepest = depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _finite_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonLimitError(
            f"a number has {len(literal)} characters; the limit is {MAX_NUMBER_CHARS}"
        )
    value = float(literal)
    if not math.isfinite(value):
        raise JsonLimitError(f"the number {literal} is out of range")
    return value


def _bounded_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonLimitError(
            f"an integer has {len(literal)} digits; the limit is {MAX_NUMBER_CHARS}"
        )
    return int(literal)


def _no_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not a JSON number")
