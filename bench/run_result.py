"""What one measured run reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class RunResult:
    """One run's figure: useful tokens over wall time, plus run-specific details."""

    name: str  # "treadle", "generate_single", ...
    requests: int  # requests served (0 for the ceiling, which serves none)
    useful_tokens: int  # tokens counted for the figure (the budgets; batch x steps for the ceiling)
    wall_s: float  # seconds the timed part took
    details: dict[str, Any] = field(default_factory=dict)  # JSON-ready extra figures

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.requests,
            "useful_tokens": self.useful_tokens,
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            **self.details,
        }


class BenchmarkError(RuntimeError):
    """A run did not do the work it was asked for (wrong token counts, failed requests)."""


def check_count(what: str, got: int, want: int) -> None:
    """Raise BenchmarkError unless `got == want` (not an assert: it must hold under -O too)."""
    if got != want:
        raise BenchmarkError(f"{what}: got {got}, expected {want}")
