"""The plugin contract: custom logits processors and stopping criteria.

Plugins live on the server and are enabled per request by name with JSON
arguments; clients never send code. A plugin object is shared by every
request; `bind` validates one request's arguments and returns that request's
own state, which travels with the request in `SamplingParams.plugins` (one
object per request owns all of its state). Each step the worker calls a
plugin once with only the rows that enabled it.

Two kinds:
- `LogitsPlugin` rewrites scores, after the built-in processors and before
  the warpers (temperature, top-k, ...).
- `StoppingPlugin` looks at the processed scores and the chosen tokens and
  says which rows should stop; the scheduler checks it last, after its own
  stopping rules.

A plain `transformers.LogitsProcessor` or `transformers.StoppingCriteria`
class is adapted by the registry (see `registry.py`): it is instantiated per
request with the JSON arguments as keyword arguments and run row by row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..error_text import shown

if TYPE_CHECKING:
    import torch

    from ..plan import RowInput


class PluginArgumentError(ValueError):
    """A request's plugin arguments are invalid; the message names the argument."""


def reject_unknown(path: str, args: Mapping[str, Any], known: Sequence[str]) -> None:
    """Raise PluginArgumentError naming the first argument of `args` not in `known`."""

    unknown = sorted(set(args) - set(known))
    if unknown:
        raise PluginArgumentError(
            f"{path}: unknown argument {shown(unknown[0])} (known: {', '.join(known)})"
        )


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin may use to validate arguments and prepare its state."""

    tokenizer: Any  # the model's transformers tokenizer
    vocab_size: int  # width of the score rows
    eos_token_ids: tuple[int, ...]


class LogitsPlugin(ABC):
    """A batch-aware custom logits processor."""

    name: str = ""

    @abstractmethod
    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> object:
        """Validate one request's arguments; return its per-request state.

        Raises `PluginArgumentError` naming the offending argument.
        """

    @abstractmethod
    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        """Return the new scores `[n, V]` for the `n` rows that enabled this plugin.

        `rows[i]` and `states[i]` describe row `i` of `scores`. May modify
        `scores` in place.
        """


class StoppingPlugin(ABC):
    """A batch-aware custom stopping criterion."""

    name: str = ""

    @abstractmethod
    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> object:
        """Validate one request's arguments; return its per-request state."""

    @abstractmethod
    def __call__(
        self,
        scores: torch.Tensor,
        next_token_ids: torch.Tensor,
        rows: Sequence[RowInput],
        states: Sequence[object],
    ) -> list[bool]:
        """Say, for each of the `n` rows, whether it should stop after this step.

        `scores` `[n, V]` are the processed scores the tokens were chosen from,
        `next_token_ids` `[n]` the chosen tokens (not yet in `rows[i].token_ids`).
        """


Plugin = LogitsPlugin | StoppingPlugin


@dataclass(frozen=True, slots=True)
class PluginBinding:
    """A plugin enabled on one request, with that request's state."""

    plugin: Plugin
    state: object

    @property
    def name(self) -> str:
        return self.plugin.name
