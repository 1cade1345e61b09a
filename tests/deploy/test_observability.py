"""deploy/observability, checked offline: every metric the Grafana dashboard or an alert
names is one the services export (or a listed external one), every alert carries its
runbook, and the kustomization renders objects a cluster with the Prometheus Operator
accepts."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

import services
from tests.deploy.test_manifests import (
    BASE,
    KUBERNETES_VERSION,
    METRICS_PORT,
    NAMESPACE,
    kubectl,
    manifests_for,
    selects,
)

OBSERVABILITY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "groupchat-dashboard.json"
RULES = OBSERVABILITY / "prometheusrule.yaml"

# Metrics that are not the suite's own: kube-state-metrics', for the pods-not-ready alert
# and panel. Everything else a dashboard or a rule names must be exported by the services.
EXTERNAL_METRICS = {
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_available",
    "kube_statefulset_replicas",
    "kube_statefulset_status_replicas_ready",
}
REQUIRED_ANNOTATIONS = {"summary", "description", "runbook"}
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")

# --- PromQL: the metric names an expression selects -------------------------------------

# Words of PromQL that look like metric names but are not.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: identifiers that are not functions, keywords, label
    names (inside {...}, by/without/on/ignoring/group_* lists) or durations."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("1", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub(" ", text)
    return {
        match[1]
        for match in _IDENTIFIER.finditer(text)
        if not match[2] and match[1] not in PROMQL_KEYWORDS
    }


def exported_names() -> set[str]:
    """Every sample name the services' processes can expose: each module under services/
    imported (metrics register at import), counters with _total, histograms with _bucket,
    _sum and _count."""
    for module in pkgutil.walk_packages(services.__path__, "services."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


# --- what deploy/observability holds -----------------------------------------------------


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def alert_rules() -> list[dict[str, Any]]:
    rule_set = yaml.safe_load(RULES.read_text())
    return [rule for group in rule_set["spec"]["groups"] for rule in group["rules"]]


def dashboard_expressions() -> dict[str, str]:
    """Each PromQL expression of the dashboard, by where it is."""
    found = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            # label_values(SELECTOR, label): only the selector is PromQL.
            selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert selector is not None, f"variable {variable['name']}: {query}"
            found[f"variable ${variable['name']}"] = selector[1]
    return found


def every_expression() -> dict[str, str]:
    rules = {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}
    return {**dashboard_expressions(), **rules}


def test_the_extractor_finds_metric_names_and_nothing_else() -> None:
    expr = """
        histogram_quantile(0.99, sum by (service, le) (rate(
          groupchat_rpc_duration_seconds_bucket{method!~".*/Subscribe", code="OK"}[$__range])))
        / on (service) group_left() max without (pod) (up{job="x"} offset 5m) > bool 1e3
        or vector(0) and kube_pod_info unless -inf
    """
    assert metric_names(expr) == {"groupchat_rpc_duration_seconds_bucket", "up", "kube_pod_info"}


def test_every_metric_a_panel_or_an_alert_names_is_exported_by_the_services() -> None:
    exported = exported_names()
    unknown = {
        where: sorted(metric_names(expr) - exported - EXTERNAL_METRICS)
        for where, expr in every_expression().items()
    }
    assert not {where: names for where, names in unknown.items() if names}, (
        "names no service exports (misspelled, or missing in services/kit/metrics.py; a "
        "metric that is not the suite's own goes in EXTERNAL_METRICS)"
    )


def test_every_expression_selects_some_metric_and_every_external_one_is_used() -> None:
    expressions = every_expression()
    assert all(metric_names(expr) for expr in expressions.values())
    used = set().union(*(metric_names(expr) for expr in expressions.values()))
    assert EXTERNAL_METRICS <= used, "EXTERNAL_METRICS lists names nothing uses any more"


def test_the_dashboard_shows_each_new_operational_metric() -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_expressions().values()))
    assert {
        "groupchat_fanout_deliveries_total",
        "groupchat_outbox_backlog",
        "groupchat_events_consumer_lag",
        "groupchat_mongodb_command_duration_seconds_bucket",
    } <= used


def test_every_alert_has_a_runbook_a_severity_and_a_valid_duration() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        assert set(rule) <= RULE_KEYS, f"{rule['alert']}: {set(rule) - RULE_KEYS}"
        assert REQUIRED_ANNOTATIONS <= set(rule["annotations"]), rule["alert"]
        assert all(str(rule["annotations"][key]).strip() for key in REQUIRED_ANNOTATIONS)
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert DURATION.match(rule.get("for", "0s")), rule["alert"]


# --- the kustomization --------------------------------------------------------------------


def rendered() -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(OBSERVABILITY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"`kubectl kustomize deploy/observability` failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_observability_kustomization_renders_the_rules_the_monitor_and_the_dashboard() -> None:
    objects = {obj["kind"]: obj for obj in rendered()}
    assert set(objects) == {"PrometheusRule", "ServiceMonitor", "ConfigMap"}
    for obj in objects.values():
        assert obj["metadata"]["namespace"] == NAMESPACE
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "groupchat"

    config_map = objects["ConfigMap"]
    kubernetes_validate.validate(config_map, KUBERNETES_VERSION, strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"][DASHBOARD.name]) == dashboard()

    rule = objects["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())["spec"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"], group


def test_the_service_monitor_scrapes_every_groupchat_service_on_its_metrics_port() -> None:
    monitor = next(obj for obj in rendered() if obj["kind"] == "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [endpoint] = monitor["spec"]["endpoints"]
    scraped = set()
    for service in manifests_for(BASE).of_kind("Service"):
        ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
        if selects(monitor["spec"]["selector"], service["metadata"].get("labels") or {}):
            if ports.get(endpoint["port"]) == METRICS_PORT:
                scraped.add(service["metadata"]["name"])
    assert scraped == {"gateway", "groups", "messaging", "plaza"}
