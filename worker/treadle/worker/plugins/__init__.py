"""Server-side plugins: custom logits processors and stopping criteria.

See `base.py` for the contract, `registry.py` for registration and the
adapters of plain transformers classes, `runner.py` for how the worker runs
them, `builtin.py` for the plugins that ship with treadle.
"""

from .base import (
    LogitsPlugin,
    PluginArgumentError,
    PluginBinding,
    PluginContext,
    StoppingPlugin,
)
from .builtin import ConfidenceStop, PhraseBoost
from .prefix_constrained import PrefixConstrained
from .registry import (
    LogitsProcessorAdapter,
    PluginRegistry,
    StoppingCriteriaAdapter,
    default_registry,
)
from .runner import PluginRowErrors, run_logits_plugins, run_stopping_plugins

__all__ = [
    "ConfidenceStop",
    "LogitsPlugin",
    "LogitsProcessorAdapter",
    "PhraseBoost",
    "PluginArgumentError",
    "PluginBinding",
    "PluginContext",
    "PluginRegistry",
    "PluginRowErrors",
    "PrefixConstrained",
    "StoppingCriteriaAdapter",
    "StoppingPlugin",
    "default_registry",
    "run_logits_plugins",
    "run_stopping_plugins",
]
