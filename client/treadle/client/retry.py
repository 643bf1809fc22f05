"""Retries by gRPC itself: a `retryPolicy` and a `retryThrottling` budget in the service config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# gRPC treats a larger maxAttempts as this (its own cap)
GRPC_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently gRPC retries a refused call; builds the service config.

    Only UNAVAILABLE is retried (no server reachable, starting, draining, a
    replica that went away): those calls did nothing on a server. gRPC retries
    a call only until the server's first response arrives, so a stream that
    delivered a token is never retried and output is never duplicated.
    RESOURCE_EXHAUSTED is not retried: a full queue (`Overloaded`, with the
    server's `retry_after`) is left to the caller, and a request over the size
    limit (`RequestTooLarge`) would fail again.

    gRPC waits a random time up to the current backoff between attempts
    (`initial_backoff`, times `multiplier` after each, at most `max_backoff`).
    The retry budget (`retryThrottling`) is shared by every call of the
    client: each failure spends one token of `budget_tokens`, each success
    gives back `budget_ratio`; below half the tokens, nothing is retried, so a
    failing fleet is not hammered by retries. `RetryPolicy.off()` for
    non-idempotent use.
    """

    max_attempts: int = 4  # including the first; 1 = no retry; gRPC caps it at 5
    initial_backoff: float = 0.25  # seconds: the first retry waits up to this
    max_backoff: float = 4.0
    multiplier: float = 2.0
    budget_tokens: int = 10  # retryThrottling.maxTokens, 1..1000
    budget_ratio: float = 0.1  # retryThrottling.tokenRatio: tokens regained per success

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be at least 1 (got {self.max_attempts})")
        for name in ("initial_backoff", "max_backoff", "multiplier"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0 (got {getattr(self, name)})")
        if not 0.001 <= self.budget_ratio <= 1000:
            raise ValueError(f"budget_ratio: must be within 0.001..1000 (got {self.budget_ratio})")
        if not 0 < self.budget_tokens <= 1000:
            raise ValueError(f"budget_tokens: must be within 1..1000 (got {self.budget_tokens})")

    @classmethod
    def off(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    @property
    def enabled(self) -> bool:
        return self.max_attempts > 1

    def method_config(self, services: list[str]) -> dict[str, Any]:
        """The service config's `methodConfig` entry for every method of `services`."""
        config: dict[str, Any] = {"name": [{"service": s} for s in services]}
        if self.enabled:
            config["retryPolicy"] = {
                "maxAttempts": min(self.max_attempts, GRPC_MAX_ATTEMPTS),
                "initialBackoff": _duration(self.initial_backoff),
                "maxBackoff": _duration(max(self.max_backoff, self.initial_backoff)),
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return config

    def throttling(self) -> dict[str, Any]:
        """The service config's `retryThrottling`: the retry budget across the client."""
        return {"maxTokens": self.budget_tokens, "tokenRatio": round(self.budget_ratio, 3)}


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.250000000s")."""
    return f"{seconds:.9f}s"
