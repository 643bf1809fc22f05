"""Alerts, recording rules, the autoscalers' queries and the Grafana dashboard read metrics the
server really exports (scraped from a real server), in PromQL that parses."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import grpc
import pytest
import yaml
from deploy.support import (
    ADAPTER_VALUES,
    DASHBOARD,
    Query,
    Rendered,
    analyse_promql,
    grafana_queries,
    only,
)
from e2e.served import greedy, start_served
from prometheus_client.parser import text_string_to_metric_families

from treadle.v1 import treadle_pb2 as pb
from treadle.worker.loader import LoadedModel

PROMPT = [101, 2045, 3310, 77, 19]
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself, not the server

# What the dashboard must show (the list), as the series that carry it.
DASHBOARD_MUST_SHOW = {
    "treadle_queue_depth",
    "treadle_running_requests",
    "treadle_generated_tokens_total",  # tokens/s
    "treadle_time_to_first_token_seconds_bucket",
    "treadle_inter_token_latency_seconds_bucket",
    "treadle_errors_total",
    "treadle_kv_usage_ratio",
}


@pytest.fixture
async def exported(tiny: LoadedModel) -> set[str]:
    """Every series name a real server exports, after a finished request and a refused one
    (labelled counters only show a series once a label value exists)."""
    served = await start_served(tiny)
    try:
        await served.stub.Generate(greedy(PROMPT, 3), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await served.stub.Generate(pb.GenerateRequest(), timeout=60)  # no input at all
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        url = f"http://127.0.0.1:{served.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        await served.stop()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def rule_queries(rendered: Rendered) -> tuple[dict[str, str], dict[str, str]]:
    """(every PromQL of the PrometheusRule by where it is, recorded name -> its expression)."""
    queries, recorded = {}, {}
    for group in only(rendered("cpu"), "PrometheusRule")["spec"]["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            queries[f"rule {name}"] = rule["expr"]
            if "record" in rule:
                recorded[rule["record"]] = rule["expr"]
    return queries, recorded


def all_queries(rendered: Rendered) -> dict[str, str]:
    queries, _ = rule_queries(rendered)
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    for i, rule in enumerate(adapter["rules"]["custom"]):
        queries[f"prometheus-adapter rule {i} seriesQuery"] = rule["seriesQuery"]
        queries[f"prometheus-adapter rule {i} metricsQuery"] = rule["metricsQuery"]
    scaled = only(rendered("cpu+keda+networkpolicy"), "ScaledObject")
    for i, trigger in enumerate(scaled["spec"]["triggers"]):
        queries[f"KEDA trigger {i}"] = trigger["metadata"]["query"]
    queries.update(grafana_queries(json.loads(DASHBOARD.read_text())))
    return queries


def analysed(queries: dict[str, str]) -> dict[str, Query]:
    out = {}
    for where, expr in queries.items():
        try:
            out[where] = analyse_promql(expr)
        except ValueError as error:
            raise AssertionError(f"{where}: {error}\n{expr}") from None
    return out


def test_every_query_reads_series_the_server_exports(
    rendered: Rendered, exported: set[str]
) -> None:
    _, recorded = rule_queries(rendered)
    assert {"treadle_queue_depth", "treadle_generated_tokens_total"} <= exported  # sanity
    used: set[str] = set()
    for where, query in analysed(all_queries(rendered)).items():
        for name in query.names:
            if ":" in name:  # a recording rule's output
                assert name in recorded, f"{where}: {name} is recorded nowhere"
            elif name not in PROMETHEUS_OWN:
                assert name in exported, f"{where}: the server exports no {name}"
                used.add(name)
        for name in query.rated:  # rate() of a gauge is a silent mistake
            assert re.search(r"_(total|bucket|sum|count)$", name), f"{where}: rate({name})"
    assert len(used) >= 10, used


def test_the_autoscalers_read_the_series_the_hpa_names(rendered: Rendered) -> None:
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    hpa = only(rendered("cpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]
    served = [r["name"]["as"] for r in adapter]
    assert hpa["metric"]["name"] in served
    rule = adapter[served.index(hpa["metric"]["name"])]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # a per-pod metric
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    assert analyse_promql(rule["seriesQuery"]).names == {"treadle_queue_depth"}
    keda = only(rendered("cpu+keda+networkpolicy"), "ScaledObject")["spec"]["triggers"][0]
    assert analyse_promql(keda["metadata"]["query"]).names == {"treadle_queue_depth"}


def expanded(expr: str, recorded: dict[str, str]) -> set[str]:
    """The server's series an expression depends on, through recording rules."""
    names = set()
    for name in analyse_promql(expr).names:
        names |= expanded(recorded[name], recorded) if name in recorded else {name}
    return names


def test_alerts_cover_queueing_errors_stalls_and_slow_first_tokens(rendered: Rendered) -> None:
    _, recorded = rule_queries(rendered)
    alerts = {
        rule["alert"]: rule
        for group in only(rendered("cpu"), "PrometheusRule")["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
    needs = {  # what the alert is about: (series it must depend on, minutes it must hold)
        "queue depth high for minutes": ({"treadle_queue_depth"}, 5),
        "error ratio": ({"treadle_errors_total", "treadle_requests_finished_total"}, 2),
        "no tokens while requests run": (
            {"treadle_running_requests", "treadle_generated_tokens_total"},
            2,
        ),
        "TTFT p99": ({"treadle_time_to_first_token_seconds_bucket"}, 5),
    }
    for need, (series, minutes) in needs.items():
        matching = [n for n, a in alerts.items() if series <= expanded(a["expr"], recorded)]
        assert len(matching) == 1, f"{need}: {matching}"
        assert _minutes(alerts[matching[0]]["for"]) >= minutes, need
    ttft = recorded[next(n for n in recorded if "time_to_first_token" in n)]
    assert "histogram_quantile(0.99" in ttft


def _minutes(duration: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"s": 1 / 60, "m": 1, "h": 60}[unit]


def test_dashboard_is_well_formed_and_shows_what_operators_need() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    boxes: list[dict[str, int]] = []
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for other in boxes:  # no two panels overlap on the grid
            assert not (
                g["x"] < other["x"] + other["w"]
                and other["x"] < g["x"] + g["w"]
                and g["y"] < other["y"] + other["h"]
                and other["y"] < g["y"] + g["h"]
            ), p["title"]
        boxes.append(g)
        if p["type"] == "row":
            continue
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "service", "pod"} <= variables
    queries = grafana_queries(dashboard)
    for where, expr in queries.items():
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in variables, f"{where}: ${var}"
    shown = set().union(*(q.names for q in analysed(queries).values()))
    assert shown >= DASHBOARD_MUST_SHOW, DASHBOARD_MUST_SHOW - shown
