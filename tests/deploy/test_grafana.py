"""deploy/grafana/sd-endpoint.json (and the autoscaler's query) against the server's real /metrics output.

The app runs in-process on the random:tiny engine and scores one request first, so that labelled series
(`sd_requests_total{route,status}`) and histograms have samples.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from service.web.app import create_app
from tests.helpers.servers import GatedEngine

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "sd-endpoint.json").read_text())
# Labels Prometheus attaches when it scrapes (target labels), absent from /metrics itself.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# What an operator asks the dashboard (issue: request rate by status, latency, queue depth, batch sizes,
# images/s, NSFW rate, 429 and 504 rates, model-load time), as metric families.
REQUIRED_FAMILIES = {
    "sd_requests",
    "sd_request_duration_seconds",
    "sd_queue_depth",
    "sd_batch_size",
    "sd_images_generated",
    "sd_images_flagged",
    "sd_rejections",
    "sd_timeouts",
    "sd_model_load_seconds",
}


@dataclass(frozen=True)
class Exposition:
    family_of: dict[str, str]  # sample name (sd_batch_size_bucket) -> family name (sd_batch_size)
    labels: dict[str, set[tuple[str, str]]]  # sample name -> every (label, value) seen


@pytest.fixture(scope="module")
def exposition(tiny_engine: Any) -> Iterator[Exposition]:
    settings = Settings(model="random:tiny", max_batch_wait_ms=0)
    engine = GatedEngine(tiny_engine)  # closing the app leaves the shared engine open
    # A loopback server answers the loopback names only (TestClient says "testserver" by default).
    with TestClient(create_app(settings, engine=engine), base_url="http://localhost") as client:
        # The app warms the engine up in a thread; `/` turns 200 when it is ready.
        deadline = time.monotonic() + 300
        while (ready := client.get("/")).status_code != 200:
            assert time.monotonic() < deadline, f"the app never became ready: {ready.text}"
            time.sleep(0.2)
        body = {
            "input_data": {
                "columns": ["prompt"],
                "data": ["a lighthouse at dusk"],
                "parameters": {"num_inference_steps": 2, "height": 128, "width": 128, "seed": 1},
            }
        }
        response = client.post("/score", json=body)
        assert response.status_code == 200, response.text
        metrics = client.get("/metrics")
        assert metrics.status_code == 200, metrics.text
    family_of: dict[str, str] = {}
    labels: dict[str, set[tuple[str, str]]] = {}
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            family_of[sample.name] = family.name
            labels.setdefault(sample.name, set()).update(sample.labels.items())
    yield Exposition(family_of, labels)


# -- reading PromQL -------------------------------------------------------------------------------------

_STRING = r'"(?:\\.|[^"\\])*"'
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(rf"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*({_STRING})")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_TOKEN = re.compile(r"\$\{?\w+\}?|\d[\w.]*|[A-Za-z_:][A-Za-z0-9_:]*(?:\s*\()?|.", re.DOTALL)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers outside strings, label sets and ranges,
    that are neither functions (followed by `(`) nor keywords."""
    bare = re.sub(_STRING, '""', expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = _GROUPING.sub(" ", bare)
    names = set()
    for token in _TOKEN.findall(bare):
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", token) and token not in _KEYWORDS:
            names.add(token)
    return names


def label_matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every matcher written inside `metric{...}`."""
    found = []
    for metric, body in _SELECTOR.findall(expr):
        for label, operator, quoted in _MATCHER.findall(body):
            found.append((metric, label, operator, json.loads(quoted)))
    return found


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in panels(DASHBOARD["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            queries.append((f"variable ${variable['name']}", inner[1] if inner else query))
    return queries


def autoscaler_queries() -> list[tuple[str, str]]:
    docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "scaledobject.yaml").read_text())
    return [
        ("deploy/k8s/scaledobject.yaml", trigger["metadata"]["query"])
        for doc in docs
        if doc
        for trigger in doc["spec"]["triggers"]
    ]


# -- tests ----------------------------------------------------------------------------------------------


def test_promql_reader_finds_series_and_skips_functions_labels_and_ranges() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(sd_x_bucket{route="/score", job=~"$job"}[$__interval])))'
    )
    assert metric_names(expr) == {"sd_x_bucket"}
    ratio = "sum(rate(a_total[5m])) / sum(rate(b_total[5m])) > bool 1e3"
    assert metric_names(ratio) == {"a_total", "b_total"}
    assert metric_names('count(up{x="sum(y)"}) or vector(0)') == {"up"}
    assert label_matchers(expr) == [
        ("sd_x_bucket", "route", "=", "/score"),
        ("sd_x_bucket", "job", "=~", "$job"),
    ]
    assert grouping_labels("max by (instance, le) (x)") == {"instance", "le"}


@pytest.mark.parametrize(("where", "expr"), dashboard_queries() + autoscaler_queries())
def test_every_series_queried_is_exposed_by_the_server(where: str, expr: str, exposition: Exposition) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no series found in {expr!r}"
    missing = names - exposition.family_of.keys()
    exposed = sorted(name for name in exposition.family_of if name.startswith("sd_"))
    assert not missing, f"{where} queries {sorted(missing)}, absent from /metrics, which exposes {exposed}"


@pytest.mark.parametrize(("where", "expr"), dashboard_queries() + autoscaler_queries())
def test_every_label_queried_exists_on_its_series(where: str, expr: str, exposition: Exposition) -> None:
    seen = {name: exposition.labels.get(name, set()) for name in metric_names(expr)}
    for metric, label, operator, value in label_matchers(expr):
        if label in TARGET_LABELS:
            continue
        values = {v for name, v in seen.get(metric, set()) if name == label}
        assert values, f"{where}: {metric} has no label {label!r} in /metrics"
        if operator == "=":
            assert value in values, (
                f"{where}: {metric}{{{label}={value!r}}} matches nothing: {sorted(values)}"
            )
    all_labels = {name for labels in seen.values() for name, _ in labels}
    unknown = grouping_labels(expr) - all_labels - TARGET_LABELS
    assert not unknown, f"{where}: groups by {sorted(unknown)}, which none of its series carry"


def test_dashboard_answers_every_operator_question(exposition: Exposition) -> None:
    names = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    used = {exposition.family_of.get(name, name) for name in names}
    assert used >= REQUIRED_FAMILIES, f"the dashboard has no panel on {sorted(REQUIRED_FAMILIES - used)}"
    latency = [expr for _, expr in dashboard_queries() if "sd_request_duration_seconds_bucket" in expr]
    quantiles = {float(q) for expr in latency for q in re.findall(r"histogram_quantile\(\s*([\d.]+)", expr)}
    assert quantiles >= {0.5, 0.95, 0.99}, f"latency shows quantiles {sorted(quantiles)}, not p50, p95, p99"


def test_dashboard_is_importable() -> None:
    every = list(panels(DASHBOARD["panels"]))
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    variables = {variable["name"] for variable in DASHBOARD["templating"]["list"]}
    for panel in every:
        if panel.get("targets"):
            uid = panel["datasource"]["uid"]
            assert uid.strip("${}") in variables, f"panel {panel['title']!r}: datasource {uid} is no variable"
    assert DASHBOARD["uid"] and DASHBOARD["title"]
