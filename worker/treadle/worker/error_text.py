"""What an error may tell a client: a generic message with an error id for a
failure (the details go to the server log only), and client values shown clipped.

Torch-free and at the bottom of the layers, so the worker (plugin failures) and
the scheduler (step failures, refusals) word them the same way.
"""

from __future__ import annotations

import logging
import reprlib
import secrets

MAX_SHOWN_CHARS = 64  # a client value echoed in an error message, at most about this long

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 3


def log_internal_error(
    log: logging.Logger, what: str, exc_info: object = True, told: str = "internal error"
) -> str:
    """Log `what` and `exc_info` (default: the exception being handled) at ERROR under a
    fresh error id; return the client's message, `told` and the id and nothing else:
    "internal error (error id 3f2a9c1b); see the server log"."""
    error_id = secrets.token_hex(4)
    log.error("%s (error id %s)", what, error_id, exc_info=exc_info)  # type: ignore[arg-type]
    return f"{told} (error id {error_id}); see the server log"


def shown(value: object) -> str:
    """`repr(value)` for an error message, at most about MAX_SHOWN_CHARS characters
    (reprlib-style: the middle of a long string becomes '...')."""
    return _REPR.repr(value)


def clipped(text: str, most: int) -> str:
    """`text`, cut to at most `most` characters with a marker saying so."""
    if len(text) <= most:
        return text
    marker = f"... ({len(text)} characters)"
    return text[: max(most - len(marker), 0)] + marker
