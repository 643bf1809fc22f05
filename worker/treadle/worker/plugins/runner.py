"""Running the plugins each row enabled, once per plugin for all of its rows.

A plugin that raises fails only the rows it was called for (the exception is
logged under an error id; the rows' message names the plugin and the id only); a plugin that
can tell which of its rows failed raises `PluginRowErrors` instead, with
its result for the others (the adapters of plain transformers classes do).
Nothing here raises because of a plugin.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterator, Sequence
from typing import TypeVar

import torch

from ..error_text import log_internal_error
from ..plan import RowInput
from .base import LogitsPlugin, Plugin, PluginBinding, StoppingPlugin

_P = TypeVar("_P", LogitsPlugin, StoppingPlugin)

log = logging.getLogger("treadle.plugins")


class PluginRowErrors(Exception):
    """A plugin call failed for some of its rows only.

    `result` is what the call computed for the other rows (the `[n, V]`
    scores of a `LogitsPlugin`, the stop flags of a `StoppingPlugin`);
    `errors` maps the failed rows' positions in the call to a message.
    """

    def __init__(self, result: object, errors: dict[int, str]) -> None:
        super().__init__(f"{len(errors)} row(s) failed: " + "; ".join(errors.values()))
        self.result = result
        self.errors = errors


def has_logits_plugins(rows: Sequence[RowInput]) -> bool:
    return any(isinstance(b.plugin, LogitsPlugin) for r in rows for b in r.params.plugins)


def run_logits_plugins(scores: torch.Tensor, rows: Sequence[RowInput]) -> dict[int, str]:
    """Apply each row's `LogitsPlugin`s to `scores` `[N, V]` in place, in each request's order.

    Plugins are called depth by depth (every request's first plugin, then
    every second one, ...), each plugin once per depth with all of its rows.
    Returns row index -> message for the rows a plugin failed; such a row
    keeps the scores it had before that plugin and runs no later plugin.
    """
    errors: dict[int, str] = {}
    for plugin, idx, states in _calls(rows, LogitsPlugin, skip=errors):  # type: ignore[type-abstract]
        errors.update(_call_logits_plugin(plugin, scores, rows, idx, states))
    return errors


def run_stopping_plugins(
    scores: torch.Tensor, next_token_ids: torch.Tensor, rows: Sequence[RowInput]
) -> tuple[set[int], dict[int, str]]:
    """Ask each row's `StoppingPlugin`s whether it should stop after this step.

    `scores` `[N, V]` are the processed scores the tokens were chosen from,
    `next_token_ids` `[N]` the chosen tokens. Returns the rows that asked to
    stop and row index -> message for the rows whose stopping plugin raised.
    """
    stops: set[int] = set()
    errors: dict[int, str] = {}
    for plugin, idx, states in _calls(rows, StoppingPlugin):  # type: ignore[type-abstract]
        asked, failed = _call_stopping_plugin(plugin, scores, next_token_ids, rows, idx, states)
        stops |= asked
        errors.update(failed)
    return stops, errors


def _calls(
    rows: Sequence[RowInput], kind: type[_P], skip: Container[int] = ()
) -> Iterator[tuple[_P, list[int], list[object]]]:
    """The calls to make: each plugin of `kind`, depth by depth (every request's
    first such plugin, then every second one, ...), once per depth with all of
    its rows and their states. A row in `skip` when its depth comes is left out.
    """
    chains = [[b for b in r.params.plugins if isinstance(b.plugin, kind)] for r in rows]
    for depth in range(max((len(c) for c in chains), default=0)):
        at_depth = [
            c[depth] if depth < len(c) and i not in skip else None for i, c in enumerate(chains)
        ]
        for plugin, idx, states in _group(at_depth):
            assert isinstance(plugin, kind)  # the chains hold only plugins of `kind`
            yield plugin, idx, states


def _call_stopping_plugin(
    plugin: StoppingPlugin,
    scores: torch.Tensor,
    next_token_ids: torch.Tensor,
    rows: Sequence[RowInput],
    idx: list[int],
    states: list[object],
) -> tuple[set[int], dict[int, str]]:
    index = torch.tensor(idx, dtype=torch.long, device=scores.device)  # [n]
    failed: dict[int, str] = {}
    flags: object
    try:
        flags = plugin(scores[index], next_token_ids[index], [rows[i] for i in idx], states)
    except PluginRowErrors as exc:
        flags, failed = exc.result, exc.errors
    except Exception as exc:
        return set(), dict.fromkeys(idx, _failure(plugin, exc))  # one log entry per call
    if not isinstance(flags, Sequence) or len(flags) != len(idx):
        got = f"{len(flags)} flags" if isinstance(flags, Sequence) else type(flags).__name__
        return set(), {i: f"plugin {plugin.name!r} answered {got} for {len(idx)} rows" for i in idx}
    stops = {i for j, i in enumerate(idx) if j not in failed and flags[j]}
    return stops, {idx[j]: message for j, message in failed.items()}


def _call_logits_plugin(
    plugin: LogitsPlugin,
    scores: torch.Tensor,
    rows: Sequence[RowInput],
    idx: list[int],
    states: list[object],
) -> dict[int, str]:
    index = torch.tensor(idx, dtype=torch.long, device=scores.device)  # [n]
    sub = scores.index_select(0, index)  # [n, V] a copy: the plugin may modify it in place
    failed: dict[int, str] = {}
    out: object
    try:
        out = plugin(sub, [rows[i] for i in idx], states)
    except PluginRowErrors as exc:
        out, failed = exc.result, exc.errors
    except Exception as exc:
        return dict.fromkeys(idx, _failure(plugin, exc))  # one log entry per call
    if not isinstance(out, torch.Tensor) or out.shape != sub.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        message = f"plugin {plugin.name!r} returned {got} instead of scores {tuple(sub.shape)}"
        return {i: message for i in idx}
    ok = [j for j in range(len(idx)) if j not in failed]
    if ok:
        keep = torch.tensor(ok, dtype=torch.long, device=scores.device)  # [k]
        scores.index_copy_(0, index[keep], out.index_select(0, keep).to(scores.dtype))
    return {idx[j]: message for j, message in failed.items()}


def _group(
    bindings: Sequence[PluginBinding | None],
) -> list[tuple[Plugin, list[int], list[object]]]:
    """Group rows by plugin: `(plugin, row indices, their states)`, in order of first use."""
    groups: dict[int, tuple[Plugin, list[int], list[object]]] = {}
    for i, b in enumerate(bindings):
        if b is not None:
            _, idx, states = groups.setdefault(id(b.plugin), (b.plugin, [], []))
            idx.append(i)
            states.append(b.state)
    return list(groups.values())


def plugin_failure(name: str, exc: BaseException) -> str:
    """Log a plugin's exception at ERROR under a fresh error id; return the row's message
    for the client, which names the plugin and the id only (the exception text may hold
    anything): "plugin 'x' failed (error id 3f2a9c1b); see the server log"."""
    what = f"plugin {name!r} failed"
    return log_internal_error(log, what, exc_info=exc, told=what)


def _failure(plugin: Plugin, exc: BaseException) -> str:
    return plugin_failure(plugin.name, exc)
