"""docs/grafana/jailbreak-antidote.json: importable, and every query names a metric `antidote serve` exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "jailbreak-antidote.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# The Prometheus series of src/jailbreak_antidote/server/metrics.py (histograms as their _bucket/_sum/_count).
METRICS = {
    "antidote_requests_total",  # {status}
    "antidote_completions_total",  # {tenant, arm}
    "antidote_refusals_total",  # {tenant, arm}
    "antidote_probe_refusals_total",  # {tenant, arm}
    *(f"antidote_harm_score_{part}" for part in ("bucket", "sum", "count")),  # {tenant, arm, le}
    *(f"antidote_request_latency_seconds_{part}" for part in ("bucket", "sum", "count")),  # {tenant, arm, le}
    "antidote_time_to_first_token_seconds_bucket",
    "antidote_alpha_bucket",
    "antidote_prompt_tokens_total",
    "antidote_completion_tokens_total",
    "antidote_batch_size_bucket",
    "antidote_queue_depth",
    "antidote_policy_reloads_total",  # {result}
}
LABELLED = ("antidote_completions", "antidote_refusals", "antidote_harm_score", "antidote_request_latency")
PER_TENANT = {name for name in METRICS if name.startswith(LABELLED)}  # series with tenant and arm labels
METRIC = re.compile(r"antidote_[a-z_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dashboard: dict) -> list[dict]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_dashboard_is_importable(dashboard):
    assert dashboard["schemaVersion"] == 39
    inputs = {item["name"]: item for item in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] and dashboard["id"] is None
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_every_panel_queries_known_metrics(dashboard):
    for panel in panels(dashboard):
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.strip() and expr.count("(") == expr.count(")"), panel["title"]
            assert target["datasource"] == DATASOURCE, panel["title"]
            names = set(METRIC.findall(expr))
            assert names and names <= METRICS, f"{panel['title']}: unknown {names - METRICS}"
            if names & PER_TENANT:  # the tenant and arm pickers filter every per-tenant series
                assert 'tenant=~"$tenant"' in expr and 'arm=~"$arm"' in expr, panel["title"]


def test_the_panels_asked_for_are_there(dashboard):
    kinds = {panel["title"]: panel["type"] for panel in panels(dashboard)}
    exprs = " ".join(target["expr"] for panel in panels(dashboard) for target in panel["targets"])
    assert kinds["Policy reloads"] == "stat"
    for name in ("antidote_completions_total", "antidote_refusals_total", "antidote_harm_score_bucket",
                 "antidote_request_latency_seconds_bucket", "antidote_requests_total",
                 "antidote_time_to_first_token_seconds_bucket", "antidote_queue_depth", "antidote_batch_size_bucket",
                 "antidote_policy_reloads_total"):  # fmt: skip
        assert name in exprs


def test_tenant_and_arm_variables_are_label_values_queries(dashboard):
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    for name in ("tenant", "arm"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        assert query.startswith("label_values(") and query.endswith(f", {name})")
        assert set(METRIC.findall(query)) <= METRICS


def test_the_metric_list_is_what_the_server_exports():
    """METRICS above against the server's own registry, so the dashboard cannot drift from metrics.py."""
    from jailbreak_antidote.server.metrics import ServerMetrics
    from jailbreak_antidote.server.policy import ARMS

    metrics = ServerMetrics(alpha_max=1.0)
    metrics.declare(["acme"], ARMS)
    metrics.requests.labels("200").inc()
    metrics.policy_reloads.labels("ok").inc()
    exported = {line.split("{")[0].split(" ")[0] for line in metrics.render().decode().splitlines()
                if line.startswith("antidote_")}  # fmt: skip
    exported -= {name for name in exported if name.endswith("_created")}
    assert exported >= METRICS  # every name the dashboard may use exists
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported}
    assert all(any(name.startswith(family) for name in METRICS) for family in families)  # and none is missing
