"""W2's arrival schedule: a seeded Poisson process."""

from __future__ import annotations

import numpy as np


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """`count` arrival times (seconds from the start, increasing) of a Poisson process.

    The gaps are independent exponentials with mean 1 / `rate` (requests per
    second), drawn from numpy's default generator seeded with `seed`, so a
    seed always gives the same schedule; the first request arrives one gap
    after the start.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
    return [float(t) for t in np.cumsum(gaps)]


def observed_rate(count: int, last_arrival_s: float) -> float:
    """Arrivals per second of `count` arrivals over [0, last arrival] (the rate's estimate)."""
    return count / last_arrival_s if last_arrival_s > 0 else 0.0
