"""The import layers: server -> scheduler -> worker, never back; the SDK and the server
meet only in the shared types (api/), which import nothing else of treadle.

Every module of the packages (found under pyproject.toml's package roots) is parsed with
`ast`; each import, relative or absolute, at the top or inside a function, is resolved to
the absolute name it loads and checked against what its layer may not import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package -> the packages it must never import (a layer never reaches above itself, the
# generated stubs, treadle.v1, are for the edges only: server/ and client/, and the SDK
# and the server share only treadle.api)
FORBIDDEN = {
    "treadle.server": ("treadle.client",),
    "treadle.client": ("treadle.server", "treadle.scheduler", "treadle.worker"),
    "treadle.scheduler": ("treadle.server", "treadle.client", "treadle.v1"),
    "treadle.worker": ("treadle.server", "treadle.scheduler", "treadle.client", "treadle.v1"),
    "treadle.api": (
        "treadle.server",
        "treadle.client",
        "treadle.scheduler",
        "treadle.worker",
        "treadle.v1",
    ),
}


def package_dirs() -> dict[str, Path]:
    """The top-level `treadle.*` packages and their folders, under pyproject.toml's roots."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    roots = pyproject["tool"]["setuptools"]["packages"]["find"]["where"]
    return {
        f"treadle.{folder.name}": folder
        for root in roots
        for folder in sorted((REPO / root / "treadle").iterdir())
        if (folder / "__init__.py").is_file()
    }


def modules(package: str, folder: Path) -> Iterator[tuple[str, bool, Path]]:
    """(module name, is a package's __init__, file) for every .py file under `folder`."""
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        yield ".".join([package, *parts]), is_package, path


def imported_names(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute name) for every import in `source`; `from a import b` yields both
    `a` and `a.b`, since `b` may be a module (`from treadle import server`)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def violations(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported name) for each import that crosses the layers backwards."""
    forbidden = next(
        (bad for pkg, bad in FORBIDDEN.items() if module == pkg or module.startswith(pkg + ".")),
        (),
    )
    return [
        (line, name)
        for line, name in imported_names(source, module, is_package)
        if any(name == bad or name.startswith(bad + ".") for bad in forbidden)
    ]


def test_the_layers_are_never_crossed_backwards() -> None:
    dirs = package_dirs()
    assert set(FORBIDDEN) <= set(dirs)
    found: list[str] = []
    checked = 0
    for package in FORBIDDEN:
        for module, is_package, path in modules(package, dirs[package]):
            checked += 1
            for line, name in violations(path.read_text(), module, is_package):
                found.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert checked > 10  # the walk really saw the packages
    assert not found, "layer violations:\n" + "\n".join(found)


def test_the_server_is_seen_importing_the_layers_below() -> None:
    """The resolver is not blind: server/ does import scheduler/ and worker/."""
    dirs = package_dirs()
    names = {
        name
        for module, is_package, path in modules("treadle.server", dirs["treadle.server"])
        for _, name in imported_names(path.read_text(), module, is_package)
    }
    assert "treadle.scheduler.engine" in names
    assert "treadle.worker.loader" in names


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("treadle.scheduler.engine", "from ..server.service import X\n", "treadle.server.service"),
        ("treadle.scheduler.engine", "import treadle.server.metrics\n", "treadle.server.metrics"),
        ("treadle.scheduler.engine", "from treadle import server\n", "treadle.server"),
        ("treadle.scheduler.engine", "def f():\n    from .. import server\n", "treadle.server"),
        ("treadle.worker.worker", "from ..scheduler.request import Request\n", "treadle.scheduler"),
        ("treadle.worker.plugins.base", "from ...scheduler import events\n", "treadle.scheduler"),
        ("treadle.server.service", "from ..client.params import X\n", "treadle.client"),
        ("treadle.client.cli", "from treadle.server import serve_cli\n", "treadle.server"),
        ("treadle.api.params", "from ..scheduler import errors\n", "treadle.scheduler"),
    ],
)
def test_a_backward_import_is_caught(module: str, source: str, expected: str) -> None:
    found = violations(source, module, is_package=False)
    assert found and any(name.startswith(expected) for _, name in found)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("treadle.server.service", "from ..scheduler.engine import Engine\n"),
        ("treadle.scheduler.engine", "from ..worker.plan import StepPlan\n"),
        ("treadle.scheduler.engine", "from .events import FinishEvent\n"),
        ("treadle.worker.plugins", "from .base import Plugin\n"),  # an __init__
        ("treadle.scheduler.engine", "import logging\n"),
        ("treadle.client.convert", "from ..api.params import GenerationParams\n"),
        ("treadle.worker.plan", "from ..api.outcome import TokenLogprob\n"),
    ],
)
def test_a_forward_import_is_allowed(module: str, source: str) -> None:
    assert violations(source, module, is_package=module == "treadle.worker.plugins") == []


def test_the_client_imports_neither_torch_nor_transformers() -> None:
    """The base install is the SDK: every client and shared-types module imports with torch
    and transformers made unimportable (a subprocess, so nothing already imported here can
    hide it)."""
    dirs = package_dirs()
    client = sorted(
        m for pkg in ("treadle.client", "treadle.api") for m, _, _ in modules(pkg, dirs[pkg])
    )
    assert {"treadle.client.cli", "treadle.api.outcome"} <= set(client)
    script = (
        "import importlib, sys\n"
        "for banned in ('torch', 'transformers'):\n"
        "    sys.modules[banned] = None  # any import of it raises ImportError\n"
        f"for name in {client!r}:\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


# What frontends may use of an engine: its read-only surface, the request calls and the
# lifecycle. Its parts (scheduler, worker, inputs, factory, loaded model, config) are not.
ENGINE_SURFACE = {
    "info",
    "tokenize",
    "token_strings",
    "accepting",
    "num_in_flight",
    "num_running",
    "num_waiting",
    "step_observers",
    "on_fatal",
    "submit",
    "abort",
    "stream",
    "open_stream",
    "generate",
    "start",
    "stop",
    "stop_accepting",
    "wait_until_idle",
}


def engine_attributes(source: str) -> Iterator[tuple[int, str]]:
    """(line, attribute) for every `engine.X` and `<...>.engine.X` in `source`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            if name == "engine":
                yield node.lineno, node.attr


def test_frontends_read_the_engine_only_through_its_surface() -> None:
    from treadle.scheduler.engine import Engine

    assert all(
        hasattr(Engine, name) or name in Engine.__init__.__code__.co_names
        for name in ENGINE_SURFACE
    )
    dirs = package_dirs()
    found: list[str] = []
    used: set[str] = set()
    for _, _, path in modules("treadle.server", dirs["treadle.server"]):
        for line, attr in engine_attributes(path.read_text()):
            used.add(attr)
            if attr not in ENGINE_SURFACE:
                found.append(f"{path.relative_to(REPO)}:{line} reads engine.{attr}")
    assert {"info", "open_stream", "num_running"} <= used  # the walk sees the service
    assert not found, "frontends reaching into the engine:\n" + "\n".join(found)


def test_a_reach_into_the_engine_is_seen() -> None:
    source = "def f(self):\n    return self.engine.scheduler.config.max_batch_rows\n"
    assert "scheduler" in {attr for _, attr in engine_attributes(source)}
