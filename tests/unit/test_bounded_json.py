"""bounded_json: strict JSON from untrusted clients, refused in one linear pass."""

from __future__ import annotations

import contextlib
import time

import pytest

from treadle.api.bounded_json import JsonLimitError, loads_bounded

LIMIT = 16384  # RequestLimits.max_plugin_args_bytes

# Documents of exactly LIMIT bytes built to make a backtracking string matcher
# retry from every quote (the old regex scan took over a second on the first).
HOSTILE = {
    "escaped quotes, unterminated": '"' + '\\"' * ((LIMIT - 1) // 2),
    "quotes only": '"' * LIMIT,
    "backslashes after a quote": '"' + "\\" * (LIMIT - 1),
    "open brackets in a string": '"' + "[" * (LIMIT - 2) + '"',
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_document_of_the_size_limit_costs_milliseconds(name: str) -> None:
    text = HOSTILE[name]
    assert len(text.encode()) <= LIMIT
    start = time.perf_counter()
    with contextlib.suppress(JsonLimitError):
        loads_bounded(text, LIMIT, 32)
    assert time.perf_counter() - start < 0.2  # linear: about a millisecond in practice


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '{"a": "[[[[{{{{\\"]]]]", "b": [["\\\\"]]}'
    assert loads_bounded(text, LIMIT, 3) == {"a": '[[[[{{{{"]]]]', "b": [["\\"]]}


def test_nesting_over_the_limit_is_refused_before_parsing() -> None:
    with pytest.raises(JsonLimitError, match="nested 100000 deep; the limit is 32"):
        loads_bounded("[" * 100_000, 1_000_000, 32)
    assert loads_bounded("[" * 32 + "]" * 32, LIMIT, 32) is not None


def test_an_unterminated_string_is_not_json() -> None:
    with pytest.raises(JsonLimitError, match="is not JSON"):
        loads_bounded(HOSTILE["escaped quotes, unterminated"], LIMIT, 32)


def test_size_numbers_and_constants_are_bounded() -> None:
    with pytest.raises(JsonLimitError, match="bytes; the limit is"):
        loads_bounded(" " * (LIMIT + 1), LIMIT, 32)
    with pytest.raises(JsonLimitError, match="digits"):
        loads_bounded("1" * 5000, LIMIT, 32)
    with pytest.raises(JsonLimitError, match="out of range"):
        loads_bounded("1e400", LIMIT, 32)
    with pytest.raises(JsonLimitError, match="NaN"):
        loads_bounded("NaN", LIMIT, 32)
