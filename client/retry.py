"""Retries with exponential backoff, only before any output was received."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from .errors import TreadleClientError

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a refused call.

    Only UNAVAILABLE (no server reachable, starting or draining) and
    RESOURCE_EXHAUSTED (queue full) are retried, and only while nothing of the
    answer has arrived: a stream that delivered a token is never retried, so
    output is never duplicated. `RetryPolicy.off()` for non-idempotent use.
    """

    max_attempts: int = 4  # including the first; 1 = no retry
    initial_backoff: float = 0.25  # seconds before the second attempt
    max_backoff: float = 4.0
    multiplier: float = 2.0
    jitter: float = 0.2  # +/- this share of each backoff, spreading clients apart

    @classmethod
    def off(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * (1 + self.jitter * (2 * rng.random() - 1))


async def with_retries(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    on_retry: Callable[[int, TreadleClientError], None] | None = None,
) -> T:
    """Run `attempt` until it succeeds, fails for good, or attempts run out.

    `attempt` raises TreadleClientError and must cover only the part of a call
    before any output arrives (callers never retry after that).
    """
    rng = random.Random()
    for n in range(1, policy.max_attempts + 1):
        try:
            return await attempt()
        except TreadleClientError as exc:
            if not is_transient(exc) or n == policy.max_attempts:
                raise
            if on_retry is not None:
                on_retry(n, exc)
            await asyncio.sleep(policy.backoff(n, rng))
    raise AssertionError("unreachable")


def is_transient(error: TreadleClientError) -> bool:
    """A refusal that may pass: not a message over the server's size limit, which stays so."""
    return error.code in RETRYABLE and "larger than max" not in error.message
