"""Helpers for the deployment tests: render the kustomizations, read the Dockerfiles, pull
metric names out of PromQL, and run `treadle serve` as a process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import promql_parser
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {
    "cpu": DEPLOY / "docker" / "Dockerfile",
    "cuda": DEPLOY / "docker" / "Dockerfile.cuda",
}
DASHBOARD = DEPLOY / "grafana" / "treadle-dashboard.json"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
VENV_BIN = Path(sys.executable).parent  # the dev tools (kubectl, hadolint) install here


def tool(name: str) -> str:
    """A command-line tool from the dev extra: the venv's own first, then PATH."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is missing: pip install -e '.[dev]' installs it"
    return found


# -- kustomize --------------------------------------------------------------------------------

# What an operator deploys: an overlay, optionally with components switched on the one way
# docs/deploy.md and the components' comments document: a kustomization of one's own that takes
# the overlay as its resource and lists the components.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("base", ()),
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "cpu+keda+networkpolicy": ("overlays/cpu", ("keda", "networkpolicy")),
    "gpu+keda+networkpolicy": ("overlays/gpu", ("keda", "networkpolicy")),
    "gpu+keda": ("overlays/gpu", ("keda",)),
}


Rendered = Callable[[str], list[dict[str, Any]]]  # the `rendered` fixture: variant -> manifests


def own_kustomization(folder: str, components: tuple[str, ...], at: Path) -> str:
    """An operator's kustomization.yaml in folder `at`: the overlay as its resource, the
    components on it (kustomize wants relative paths)."""
    k8s = os.path.relpath(K8S, at)
    return yaml.safe_dump(
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"{k8s}/{folder}"],
            "components": [f"{k8s}/components/{c}" for c in components],
        }
    )


def render_variant(name: str, scratch: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` one variant; components through a kustomization in `scratch`."""
    folder, components = VARIANTS[name]
    root = K8S / folder
    if components:
        root = scratch / name
        root.mkdir(parents=True)
        (root / "kustomization.yaml").write_text(own_kustomization(folder, components, root))
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = of_kind(docs, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def of_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = only(docs, "Deployment", "treadle")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "treadle")


def config_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the pod gets from its ConfigMap (the generated, hashed name)."""
    container = server_container(docs)
    names = [s["configMapRef"]["name"] for s in container.get("envFrom", [])]
    assert len(names) == 1, names
    return dict(only(docs, "ConfigMap", names[0])["data"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- Dockerfiles --------------------------------------------------------------------------------


@dataclass
class Stage:
    """One build stage of a Dockerfile, its instructions with variables expanded."""

    name: str
    base: str
    args: dict[str, str] = field(default_factory=dict)  # build-time only
    env: dict[str, str] = field(default_factory=dict)  # what the container sees
    runs: list[str] = field(default_factory=list)
    copies: list[list[str]] = field(default_factory=list)  # each COPY's words, flags included
    user: str = ""
    expose: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        word, _, rest = logical.partition(" ")
        yield word.upper(), rest.strip()
        logical = ""


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


def parse_dockerfile(path: Path, base_path: str = "/usr/local/bin:/usr/bin:/bin") -> list[Stage]:
    """The stages of a Dockerfile, in order; `$PATH` starts as the base image's `base_path`."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for word, rest in instructions(path):
        stage = stages[-1] if stages else None
        scope = {"PATH": base_path, **global_args}
        if stage is not None:
            scope |= stage.args | stage.env
        if word == "ARG":
            name, eq, default = rest.partition("=")
            value = expand(default, scope) if eq else global_args.get(name, "")
            (global_args if stage is None else stage.args)[name] = value
        elif word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=expand(parts[0], scope)))
        elif stage is None:
            raise AssertionError(f"{path.name}: {word} before FROM")
        elif word == "ENV":
            words = shlex.split(rest)
            if "=" in words[0]:
                pairs = [tuple(w.split("=", 1)) for w in words]
            else:  # the old `ENV KEY VALUE` form
                pairs = [(words[0], " ".join(words[1:]))]
            for key, value in pairs:
                stage.env[key] = expand(value, scope)
        elif word == "RUN":
            stage.runs.append(expand(rest, scope))
        elif word == "COPY":
            stage.copies.append(shlex.split(expand(rest, scope)))
        elif word == "USER":
            stage.user = expand(rest, scope)
        elif word == "EXPOSE":
            stage.expose += expand(rest, scope).split()
        elif word == "VOLUME":
            stage.volumes += json.loads(rest) if rest.startswith("[") else rest.split()
        elif word == "ENTRYPOINT":
            stage.entrypoint = json.loads(rest)  # exec form only: signals reach the server
        elif word == "CMD":
            stage.cmd = json.loads(rest)
    return stages


# -- PromQL -------------------------------------------------------------------------------------

# Grafana's variables and prometheus-adapter's templates, replaced by something PromQL parses.
_SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "<<.Series>>": "treadle_queue_depth",
    "<<.LabelMatchers>>": 'namespace="treadle",pod=~"a|b"',
    "<<.GroupBy>>": "pod",
}


COUNTER_RATES = {"rate", "irate", "increase"}  # only meaningful on counters


@dataclass
class Query:
    """What a PromQL expression reads."""

    names: set[str]  # every metric name selected
    rated: set[str]  # the names under rate(), irate() or increase()


def analyse_promql(expr: str) -> Query:
    """Parse `expr` (raises ValueError on a syntax or type error) and list what it reads."""
    for placeholder, value in _SUBSTITUTIONS.items():
        expr = expr.replace(placeholder, value)
    expr = re.sub(r"\$(\w+)", r"\1", expr)  # "$namespace" inside label values
    query = Query(set(), set())

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            query.names.add(node.name)
        if isinstance(node, promql_parser.Call) and node.func.name in COUNTER_RATES:
            query.rated.add(node.args[0].vector_selector.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return query


def grafana_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL query of a dashboard (panel targets, template variables), by where it is."""
    queries: dict[str, str] = {}

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard["panels"]):
        for t in p.get("targets", []):
            where = f"panel {p['id']} ({p['title']}) target {t['refId']}"
            assert where not in queries, f"{where} twice"
            queries[where] = t["expr"]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            found = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert found, f"variable {v['name']}: {query}"
            queries[f"variable {v['name']}"] = found.group(1)
    return queries


# -- `treadle serve` as a process ------------------------------------------------------------------


class ServeProcess:
    """A `treadle serve` subprocess whose log is read as it comes (so it never blocks on it)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.log: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.ensure_future(self._read())
        self.port = 0
        self.metrics_port = 0

    @classmethod
    async def start(
        cls, argv: list[str], env: dict[str, str], name: str = "server"
    ) -> ServeProcess:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        return cls(proc, name)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := (await self.proc.stderr.readline()).decode():
            async with self._changed:
                self.log.append(line)
                self._changed.notify_all()
        async with self._changed:
            self.log.append("")  # end of the log
            self._changed.notify_all()

    async def wait_log(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """The first log line matching `pattern`, waiting for it (bounded)."""

        def search() -> re.Match[str] | None:
            for line in self.log:
                if found := re.search(pattern, line):
                    return found
            return None

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: search() is not None or "" in self.log)
        except TimeoutError:
            pass
        found = search()
        assert found, f"{self.name} never logged {pattern!r}:\n{''.join(self.log)}"
        return found

    async def listening(self) -> None:
        """Read the bound ports from the log."""
        found = await self.wait_log(r"listening on [\d.]+:(\d+)(?:.*metrics on \S*:(\d+))?")
        self.port = int(found.group(1))
        self.metrics_port = int(found.group(2) or 0)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_serving(self, timeout: float = 120) -> None:
        """Follow the grpc.health.v1 Watch stream until SERVING (bounded, no polling)."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(timeout):
                async for update in health.Watch(health_pb2.HealthCheckRequest(service="")):
                    if update.status == health_pb2.HealthCheckResponse.SERVING:
                        return

    async def stop(self) -> int:
        """SIGKILL if still running (test clean-up); the exit code."""
        if self.proc.returncode is None:
            self.proc.kill()
        code = await self.proc.wait()
        await self._reader
        return code
