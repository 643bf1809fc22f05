"""The project's stated benchmark goals, checked against a run's figures."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Goal:
    text: str  # as a reader states it
    figure: str  # a key of the figures the goal is checked against
    compare: Callable[[float, float], bool]
    target: float


W1_GOALS = (
    Goal("treadle >= 3x transformers_cb", "treadle/transformers_cb", operator.ge, 3.0),
    Goal(
        "treadle >= 0.80x ceiling (mean of before and after)", "treadle/ceilings", operator.ge, 0.80
    ),
    Goal("scheduler share of step time < 10%", "scheduler_share", operator.lt, 0.10),
)

# The cost of the frontends: W1 through the server against the in-process engine.
GRPC_GOALS = (
    Goal("W1 over gRPC >= 0.90x in-process", "w1_grpc/w1_inprocess", operator.ge, 0.90),
    Goal("W1 over HTTP >= 0.90x in-process", "w1_http/w1_inprocess", operator.ge, 0.90),
)


def check_goals(
    figures: dict[str, float], goals: tuple[Goal, ...] = W1_GOALS
) -> list[dict[str, Any]]:
    """Each goal with its measured value and whether it is met (None: not measured)."""
    checked = []
    for goal in goals:
        value = figures.get(goal.figure)
        checked.append(
            {
                "goal": goal.text,
                "figure": goal.figure,
                "target": goal.target,
                "value": None if value is None else round(value, 4),
                "met": None if value is None else bool(goal.compare(value, goal.target)),
            }
        )
    return checked
