"""The server's plugin registry, and the adapters for plain transformers classes.

The server owns one `PluginRegistry`: plugins are registered by name (built
in, from the `treadle.plugins` entry point group, or from `--plugin` specs),
and each request binds the ones it enables with its JSON arguments.

A plain `transformers.LogitsProcessor` or `StoppingCriteria` subclass is
wrapped by an adapter: each request gets its own instance, `cls(**args)`,
and it runs row by row on the rows that enabled it.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from ..error_text import clipped, shown
from ..plan import RowInput
from .base import (
    LogitsPlugin,
    Plugin,
    PluginArgumentError,
    PluginBinding,
    PluginContext,
    StoppingPlugin,
)
from .builtin import ConfidenceStop, PhraseBoost
from .prefix_constrained import PrefixConstrained
from .runner import PluginRowErrors, plugin_failure

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class PluginRegistry:
    """Plugins by name; `bind` validates a request's arguments and returns its binding.

    Holds no request state: the state a plugin makes in `bind` travels with
    the request. Names are unique; registering one twice is an error.
    """

    def __init__(self) -> None:
        self._plugins: dict[str, Plugin] = {}

    def register(self, name: str, plugin: Plugin | type) -> None:
        """Register a plugin object, a plugin class (instantiated without arguments)
        or a `transformers.LogitsProcessor` / `StoppingCriteria` subclass (adapted)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"plugin name {name!r}: letters, digits, '_', '.', '-' only")
        if name in self._plugins:
            raise ValueError(f"plugin {name!r} is already registered")
        self._plugins[name] = _as_plugin(name, plugin)

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def get(self, name: str) -> Plugin:
        try:
            return self._plugins[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise PluginArgumentError(
                f"plugins[{name}].name: unknown plugin {shown(name)} (known: {known})"
            ) from None

    def bind(self, name: str, args: Mapping[str, Any], ctx: PluginContext) -> PluginBinding:
        """Validate one request's `args` for plugin `name`; raises `PluginArgumentError`."""
        plugin = self.get(name)
        if not isinstance(args, Mapping):
            raise PluginArgumentError(
                f"plugins[{name}]: arguments must be an object, got {type(args).__name__}"
            )
        return PluginBinding(plugin, plugin.bind(args, ctx))

    def load(self, spec: str) -> None:
        """Register the object named by `module:attr` or `name=module:attr` (a --plugin flag).

        Without `name=`, the object's `name` attribute is used when it has one,
        else the last part of `attr`.
        """
        name, _, target = spec.rpartition("=")
        module_name, sep, attr = target.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"plugin spec {spec!r}: expected 'module:attr' or 'name=module:attr'")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"plugin spec {spec!r}: {exc}") from exc
        self.register(name.strip() or _default_name(obj, attr), obj)

    def load_entry_points(self, group: str = "treadle.plugins") -> None:
        """Register every entry point of `group` under the entry point's name."""
        for ep in entry_points(group=group):
            try:
                obj = ep.load()
            except Exception as exc:
                raise ValueError(f"plugin entry point {ep.name!r} ({ep.value}): {exc}") from exc
            self.register(ep.name, obj)


def default_registry() -> PluginRegistry:
    """A new registry with the built-in plugins and the installed entry points registered."""
    registry = PluginRegistry()
    registry.register(PhraseBoost.name, PhraseBoost())
    registry.register("confidence_stop", ConfidenceStop)
    registry.register(PrefixConstrained.name, PrefixConstrained())
    registry.load_entry_points()
    return registry


class LogitsProcessorAdapter(LogitsPlugin):
    """A plain `transformers.LogitsProcessor` class as a plugin.

    Each request gets its own instance `cls(**args)`; each step it is called
    per row with `input_ids` `[1, L]` (the row's tokens) and that row's
    scores `[1, V]`. A row whose call raises fails alone.
    """

    def __init__(self, name: str, cls: type[LogitsProcessor]) -> None:
        self.name = name
        self.cls = cls

    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> object:
        return _instantiate(self.name, self.cls, args)

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        errors: dict[int, str] = {}
        for i, (row, processor) in enumerate(zip(rows, states, strict=True)):
            input_ids = _input_ids(row.token_ids, scores.device)  # [1, L]
            try:
                out = processor(input_ids, scores[i : i + 1])  # type: ignore[operator]
                if not isinstance(out, torch.Tensor) or out.shape != (1, scores.shape[1]):
                    raise TypeError(f"returned {getattr(out, 'shape', type(out))}, not [1, V]")
                scores[i] = out[0]
            except Exception as exc:
                errors[i] = plugin_failure(self.name, exc)
        if errors:
            raise PluginRowErrors(scores, errors)
        return scores


class StoppingCriteriaAdapter(StoppingPlugin):
    """A plain `transformers.StoppingCriteria` class as a plugin.

    Each request gets its own instance `cls(**args)` (which may keep state
    across steps); each step it is called per row with `input_ids` `[1, L+1]`
    (the row's tokens and the chosen one) and that row's scores `[1, V]`.
    A true result stops the row; a row whose call raises fails alone.
    """

    def __init__(self, name: str, cls: type[StoppingCriteria]) -> None:
        self.name = name
        self.cls = cls

    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> object:
        return _instantiate(self.name, self.cls, args)

    def __call__(
        self,
        scores: torch.Tensor,
        next_token_ids: torch.Tensor,
        rows: Sequence[RowInput],
        states: Sequence[object],
    ) -> list[bool]:
        flags: list[bool] = []
        errors: dict[int, str] = {}
        chosen = next_token_ids.tolist()
        for i, (row, criteria) in enumerate(zip(rows, states, strict=True)):
            input_ids = _input_ids([*row.token_ids, chosen[i]], scores.device)  # [1, L+1]
            try:
                done = criteria(input_ids, scores[i : i + 1])  # type: ignore[operator]
                flags.append(bool(done.any()) if isinstance(done, torch.Tensor) else bool(done))
            except Exception as exc:
                flags.append(False)
                errors[i] = plugin_failure(self.name, exc)
        if errors:
            raise PluginRowErrors(flags, errors)
        return flags


def _as_plugin(name: str, plugin: Plugin | type) -> Plugin:
    if isinstance(plugin, type):
        if issubclass(plugin, LogitsPlugin | StoppingPlugin):
            return _as_plugin(name, plugin())
        if issubclass(plugin, LogitsProcessor):
            return LogitsProcessorAdapter(name, plugin)
        if issubclass(plugin, StoppingCriteria):
            return StoppingCriteriaAdapter(name, plugin)
    elif isinstance(plugin, LogitsPlugin | StoppingPlugin):
        if plugin.name != name:  # registered under another name: a renamed copy
            plugin = copy.copy(plugin)
            plugin.name = name
        return plugin
    raise TypeError(
        f"plugin {name!r}: expected a LogitsPlugin or StoppingPlugin, or a subclass of "
        f"transformers.LogitsProcessor or StoppingCriteria, got {plugin!r}"
    )


def _instantiate(name: str, cls: type, args: Mapping[str, Any]) -> object:
    try:
        return cls(**args)
    except PluginArgumentError:
        raise
    except (TypeError, ValueError) as exc:
        # "Cls.__init__() got an unexpected keyword argument 'x'" -> "got an unexpected ..."
        message = re.sub(r"^[\w.<>]*\(\)\s*", "", str(exc))
        raise PluginArgumentError(f"plugins[{name}]: {clipped(message, 256)}") from exc


def _input_ids(token_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(token_ids)], dtype=torch.long, device=device)  # [1, L]


def _default_name(obj: Any, attr: str) -> str:
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) and name else attr.rpartition(".")[2]
