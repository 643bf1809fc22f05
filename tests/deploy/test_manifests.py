"""The Kubernetes manifests: every variant renders and validates offline, and the objects
agree with each other, with the image and with the server they run."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring
from deploy.support import (
    DOCKERFILES,
    K8S,
    REPO,
    VARIANTS,
    Rendered,
    config_env,
    of_kind,
    only,
    parse_dockerfile,
    selects,
    server_container,
    tool,
)

from treadle.server.serve_cli import add_serve_arguments
from treadle.server.service import service_names

# The oldest Kubernetes the manifests are meant for, and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

# Custom resources, checked against models generated from their published CRD schemas
# (prometheus-operator 0.80, KEDA 2.16).
CRD_MODELS: dict[tuple[str, str], Any] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
}

POD_LABELS = {"app.kubernetes.io/name": "treadle", "app.kubernetes.io/component": "server"}


def dropped_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths present in `given` but absent from the model's dump: fields the schema lacks."""
    if isinstance(given, dict) and isinstance(kept, dict):
        return [
            p
            for key, value in given.items()
            for p in (
                dropped_fields(value, kept[key], f"{path}.{key}")
                if key in kept
                else [f"{path}.{key}"]
            )
        ]
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [
            p
            for i, (g, k) in enumerate(zip(given, kept, strict=True))
            for p in dropped_fields(g, k, f"{path}[{i}]")
        ]
    return []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_renders_and_validates(rendered: Rendered, variant: str) -> None:
    docs = rendered(variant)
    assert only(docs, "Deployment", "treadle")
    for doc in docs:
        where = f"{variant}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "treadle", where
        model = CRD_MODELS.get((doc["apiVersion"], doc["kind"]))
        if model is None:  # a built-in kind: the Kubernetes OpenAPI schemas, strictly
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as error:
                    path = "/".join(map(str, error.path))
                    raise AssertionError(
                        f"{where} ({version}) at {path}: {error.message}"
                    ) from None
        else:  # required fields and types from the CRD; no field the CRD does not know
            parsed = model.model_validate(doc)
            kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
            assert dropped_fields(doc, kept) == [], f"{where}: fields the CRD does not have"


def test_a_broken_manifest_fails_validation(rendered: Rendered) -> None:
    """The validators above do reject mistakes (so their silence means something)."""
    deployment = only(rendered("cpu"), "Deployment", "treadle")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    scaled = only(rendered("cpu+keda+networkpolicy"), "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # KEDA wants strings here
    with pytest.raises(ValueError, match="threshold"):
        keda.ScaledObject.model_validate(scaled)
    monitor = only(rendered("cpu"), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"  # a typo the CRD model ignores...
    kept = monitoring.ServiceMonitor.model_validate(monitor).model_dump(
        mode="json", by_alias=True, exclude_unset=True
    )
    assert dropped_fields(monitor, kept) == [".spec.endpoints[0].intervall"]  # ...but not we
    rule = only(rendered("cpu"), "PrometheusRule")
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    with pytest.raises(ValueError, match="expr"):
        monitoring.PrometheusRule.model_validate(rule)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes_ports_and_drain_fit_the_server(rendered: Rendered, variant: str) -> None:
    docs = rendered(variant)
    deployment = only(docs, "Deployment", "treadle")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(docs)
    image = parse_dockerfile(DOCKERFILES["cpu" if variant == "cpu" else "cuda"])[-1]
    env = image.env | config_env(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": int(env["TREADLE_PORT"]),
        "http": int(env["TREADLE_HTTP_PORT"]),
        "metrics": int(env["TREADLE_METRICS_PORT"]),
    }

    # gRPC health probes on the server's port: readiness on the Generation service, liveness
    # and startup on "" (the server reports both; NOT_SERVING while loading and draining).
    probes = {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["grpc"]["port"] == ports["grpc"]
    assert probes["readinessProbe"]["grpc"]["service"] in service_names()
    assert probes["livenessProbe"]["grpc"]["service"] == ""
    assert probes["startupProbe"]["grpc"]["service"] == ""
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # loading is not death
    liveness = probes["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30

    # Drain: preStop sleeps, then SIGTERM gives TREADLE_GRACE_PERIOD; the kubelet waits longer.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    grace = float(env["TREADLE_GRACE_PERIOD"])
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + grace + 10
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count

    # Security: the image's non-root user, nothing writable but the mounted volumes.
    uid, gid = (int(x) for x in image.user.split(":"))
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts and env["HOME"] == "/tmp"
    assert set(image.volumes) <= set(mounts)  # the image's cache volume is a pod volume
    assert env["HF_HOME"].startswith(image.volumes[0])
    volumes = {v["name"] for v in pod["volumes"]}
    assert set(mounts.values()) <= volumes


def test_gpu_overlay_asks_for_a_gpu_and_the_cpu_one_does_not(rendered: Rendered) -> None:
    gpu = server_container(rendered("gpu"))["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert config_env(rendered("gpu"))["TREADLE_DEVICE"] == "cuda"
    tolerations = only(rendered("gpu"), "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    cpu = server_container(rendered("cpu"))
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert (
        only(rendered("cpu"), "Deployment")["spec"]["template"]["spec"].get("tolerations") is None
    )
    assert server_container(rendered("cpu"))["image"].endswith("-cpu")
    assert server_container(rendered("gpu"))["image"].endswith("-cuda")
    threads = next(e for e in cpu["env"] if e["name"] == "OMP_NUM_THREADS")
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"


@pytest.mark.parametrize("variant", ["cpu", "cpu+keda+networkpolicy"])
def test_services_monitor_budget_and_policy_select_the_pods(
    rendered: Rendered, variant: str
) -> None:
    docs = rendered(variant)
    pod = only(docs, "Deployment", "treadle")["spec"]["template"]
    assert selects(only(docs, "Deployment")["spec"]["selector"]["matchLabels"], POD_LABELS)
    assert pod["metadata"]["labels"] == POD_LABELS
    container_ports = {p["name"] for p in server_container(docs)["ports"]}

    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    assert set(services) == {"treadle", "treadle-headless"}
    for service in services.values():
        assert service["spec"]["selector"] == POD_LABELS
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports and port["name"] == port["targetPort"]
    assert services["treadle-headless"]["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in services["treadle-headless"]["spec"]["ports"]} == {"grpc"}
    assert {p["name"] for p in services["treadle"]["spec"]["ports"]} == {"grpc", "http", "metrics"}

    # Prometheus scrapes through exactly one Service (two would count every replica twice).
    monitor = only(docs, "ServiceMonitor")["spec"]
    scraped = [
        s
        for s in services.values()
        if selects(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["treadle"]
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    assert monitor["endpoints"][0]["path"] == "/metrics"

    budget = only(docs, "PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"] == POD_LABELS and budget["maxUnavailable"] == 1

    policies = of_kind(docs, "NetworkPolicy")
    if "networkpolicy" in variant:
        spec = policies[0]["spec"]
        assert spec["podSelector"]["matchLabels"] == POD_LABELS
        allowed = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
        assert allowed == container_ports
    else:
        assert policies == []


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_exactly_one_autoscaler_on_queue_depth(rendered: Rendered, overlay: str) -> None:
    plain, with_keda = rendered(overlay), rendered(f"{overlay}+keda+networkpolicy")
    assert of_kind(plain, "ScaledObject") == []
    hpa = only(plain, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "treadle",
    }
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "treadle_queue_depth"
    assert hpa["minReplicas"] >= 2  # one replica draining still leaves one serving

    assert of_kind(with_keda, "HorizontalPodAutoscaler") == []  # KEDA makes its own
    scaled = only(with_keda, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "treadle"
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (
        hpa["minReplicas"],
        hpa["maxReplicas"],
    )
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == metric["pods"]["target"]["averageValue"]
    assert "treadle_queue_depth" in trigger["metadata"]["query"]
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_config_sets_only_settings_the_server_reads(
    rendered: Rendered, overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt TREADLE_* variable would be ignored in silence: every key must be one that
    `treadle serve` reads, and the values must parse with its own flag parser."""
    config = config_env(rendered(overlay))
    help_text = argparse.ArgumentParser()
    add_serve_arguments(help_text)
    known = set(re.findall(r"TREADLE_[A-Z_]+", help_text.format_help()))  # each flag names its own
    assert set(config) <= known, set(config) - known
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)  # reads the environment for its defaults
    args = parser.parse_args([])
    assert args.step_token_budget == int(config["TREADLE_STEP_TOKEN_BUDGET"])
    assert args.grace_period == float(config["TREADLE_GRACE_PERIOD"])
    if overlay == "cpu":
        assert args.kv_cache_memory == int(config["TREADLE_KV_CACHE_MEMORY"])
        assert args.decode_lanes_memory == int(config["TREADLE_DECODE_LANES_MEMORY"])
    else:  # empty: the server's CUDA defaults (a share of the GPU's free memory; no lanes)
        assert config["TREADLE_KV_CACHE_MEMORY"] == "" and args.kv_cache_memory is None
        assert config["TREADLE_DECODE_LANES_MEMORY"] == "" and args.decode_lanes_memory is None


@pytest.mark.parametrize(
    ("overlay", "dtype_bytes", "env_file"),
    [("cpu", 4, "base/server.env"), ("gpu", 2, "overlays/gpu/server.env")],
)
def test_kv_cache_arithmetic_holds_for_the_default_model(
    rendered: Rendered, smol_dir: Path, overlay: str, dtype_bytes: int, env_file: str
) -> None:
    """The KV pool the ConfigMap asks for, from SmolLM2's own config: the bytes per position
    the env file states, and on CPU (where the pool lives in the pod's memory) the pool's size
    and positions it states, within the memory request."""
    config = config_env(rendered(overlay))
    model = json.loads((smol_dir / "config.json").read_text())
    head_dim = model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]
    per_position = model["num_hidden_layers"] * 2 * model["num_key_value_heads"] * head_dim
    stated = " ".join((REPO / "deploy" / "k8s" / env_file).read_text().replace("#", "").split())
    assert f"{per_position * dtype_bytes:,} bytes per position" in stated
    if overlay == "cpu":
        kv = int(config["TREADLE_KV_CACHE_MEMORY"])
        block = int(config.get("TREADLE_BLOCK_SIZE", "16"))  # the server's default block size
        positions = kv // (per_position * dtype_bytes * block) * block  # whole blocks
        assert f"{kv:,} B = {kv / 2**30:.2f} GiB holds {positions:,} positions" in stated
        weights = sum(f.stat().st_size for f in smol_dir.glob("*.safetensors"))
        resources = server_container(rendered(overlay))["resources"]
        request = _bytes(resources["requests"]["memory"])
        lanes = int(config["TREADLE_DECODE_LANES_MEMORY"])
        assert f"{lanes:,} B = {lanes / 2**30:.3f} GiB" in stated
        assert request >= kv + lanes + weights + 2**30  # + Python, torch and activations
        assert _bytes(resources["limits"]["memory"]) >= request
    else:  # the pool lives in GPU memory, sized by the server from what is free
        assert config["TREADLE_KV_CACHE_MEMORY"] == ""


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


def documented_routes() -> dict[str, str]:
    """Every documented way of switching the keda component on: the YAML in docs/deploy.md and
    in the component's own comment."""
    docs = (REPO / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", docs, re.S)
    routes = {f"docs block {i}": b for i, b in enumerate(blocks) if "components/keda" in b}
    comment = [
        line.removeprefix("#").strip()
        for line in (K8S / "components" / "keda" / "kustomization.yaml").read_text().splitlines()
        if line.startswith("#   ")
    ]
    routes["the component's comment"] = "\n".join(comment)
    return routes


@pytest.mark.parametrize("route", list(documented_routes()))
def test_each_documented_keda_route_keeps_the_overlays_bounds(
    route: str, rendered: Rendered, tmp_path: Path
) -> None:
    """G8: KEDA on the gpu overlay scales to the GPU overlay's 4 replicas, not the base's 8."""
    text = documented_routes()[route].replace("<treadle>", os.path.relpath(REPO, tmp_path))
    own = yaml.safe_load(text)
    own.setdefault("apiVersion", "kustomize.config.k8s.io/v1beta1")
    own.setdefault("kind", "Kustomization")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(own))
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    overlay = own["resources"][0].rsplit("/", 1)[-1]
    hpa = only(rendered(overlay), "HorizontalPodAutoscaler")["spec"]
    assert of_kind(docs, "HorizontalPodAutoscaler") == []
    scaled = only(docs, "ScaledObject")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (
        hpa["minReplicas"],
        hpa["maxReplicas"],
    )
    if overlay == "gpu":
        assert scaled["maxReplicaCount"] == 4
