"""Operations manifests: monitoring, uninstall, priority classes, the license.

The alert rules may only name metrics the code exports: the names are collected from the
webhook's and the agent's own registries, and every metric a PromQL expression reads must be
one of them (a renamed metric would otherwise leave an alert that never fires).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar.__main__ import build_parser
from sidecar.agent import AgentMetrics
from sidecar.layout import CONTAINER_CACHE_DIR
from tests.fixtures.kustomize import _apply_component, load_yaml_docs, render
from webhook.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.30"

# --- PromQL: which metric names an expression reads -------------------------------------------

_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bool", "bottomk", "by",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "count", "count_over_time",
    "delta", "deriv", "floor", "group", "group_left", "group_right", "histogram_quantile",
    "idelta", "ignoring", "increase", "irate", "label_replace", "max", "max_over_time", "min",
    "min_over_time", "offset", "on", "predict_linear", "quantile", "rate", "resets", "round",
    "scalar", "sort", "sort_desc", "stddev", "sum", "sum_over_time", "time", "topk", "vector",
    "without", "and", "or", "unless",
}  # fmt: skip
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS_RE = re.compile(r"\{[^}]*\}")
_RANGE_RE = re.compile(r"\[[^\]]*\]")
_GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT_RE = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER_RE = re.compile(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b")


def metric_names_in(expr: str) -> set[str]:
    text = _STRING_RE.sub(" ", expr)
    text = _MATCHERS_RE.sub(" ", text)
    text = _RANGE_RE.sub(" ", text)
    text = _GROUPING_RE.sub(" ", text)
    text = _NUMBER_RE.sub(" ", text)
    return {t for t in _IDENT_RE.findall(text) if t not in _FUNCTIONS}


def exported_names() -> set[str]:
    """Every series name the webhook and the agent can expose, from their registries."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    names: set[str] = set()
    for registry in (AgentMetrics(CollectorRegistry()).registry, Metrics().registry):
        for family in registry.collect():
            names |= {family.name + s for s in suffixes[family.type]}
    return names


def rules() -> list[dict[str, Any]]:
    [doc] = load_yaml_docs(MANIFESTS / "monitoring" / "prometheusrule.yaml")
    return [r for group in doc["spec"]["groups"] for r in group["rules"]]


def test_the_promql_reader_finds_metric_names() -> None:
    expr = (
        'sum by (node, reason) (increase(modelcache_a_total{result="x"}[15m])) / '
        "clamp_min(sum(rate(b_bucket[5m])), 1e-9) > 0.2 and time() - c_seconds > 600"
    )
    assert metric_names_in(expr) == {"modelcache_a_total", "b_bucket", "c_seconds"}


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_every_rule_reads_only_exported_metrics(rule: dict[str, Any]) -> None:
    exported = exported_names() | {r["record"] for r in rules() if "record" in r}
    used = metric_names_in(rule["expr"])
    assert used, rule["expr"]
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def test_alerts_cover_warmups_webhook_errors_and_disk() -> None:
    text = {r["alert"]: r["expr"] for r in rules() if "alert" in r}
    assert any("modelcache_warmup_failures_total" in e for e in text.values())
    assert any("modelcache_webhook_errors_total" in e for e in text.values())
    assert any("modelcache_disk_free_bytes" in e for e in text.values())
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]


def test_a_renamed_metric_would_be_caught() -> None:
    assert "modelcache_disk_free_bytes" in exported_names()
    assert "modelcache_prewarm_bytes_total" not in exported_names()  # gauges have no _total


def test_monitoring_objects_select_what_exists() -> None:
    objs = render(MANIFESTS / "monitoring")
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    for svc in services.values():
        kubernetes_validate.validate(svc, K8S_VERSION, strict=True)
    [webhook_svc] = load_yaml_docs(MANIFESTS / "core" / "service.yaml")
    services[webhook_svc["metadata"]["name"]] = webhook_svc
    [ds] = [d for d in load_yaml_docs(MANIFESTS / "agent" / "daemonset.yaml")]
    agent_ports = {p["name"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    agent_svc = services["modelcache-agent-metrics"]
    assert (
        agent_svc["spec"]["selector"].items()
        <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert {p["targetPort"] for p in agent_svc["spec"]["ports"]} <= agent_ports
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for mon in monitors:
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        want = mon["spec"]["selector"]["matchLabels"]
        matching = [s for s in services.values() if want.items() <= s["metadata"]["labels"].items()]
        assert matching, mon["metadata"]["name"]
        for endpoint in mon["spec"]["endpoints"]:
            assert any(
                endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matching
            )
    [rule] = [o for o in objs if o["kind"] == "PrometheusRule"]
    assert rule["metadata"]["namespace"] == "modelcache-system"


# --- uninstall --------------------------------------------------------------------------------


def test_uninstall_daemonset_runs_the_cli_on_the_agents_cache() -> None:
    from webhook.config import DEFAULT_CACHE_HOST_PATH

    objs = render(MANIFESTS / "uninstall")
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    [ds] = [o for o in objs if o["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    argv = [a.replace("$(NODE_NAME)", "n1") for a in init["command"][3:] + init["args"]]
    args = build_parser().parse_args(argv)
    assert (args.role, args.cache_dir, args.node) == ("uninstall", CONTAINER_CACHE_DIR, "n1")
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = init["volumeMounts"]
    assert volumes[mount["name"]]["hostPath"]["path"] == DEFAULT_CACHE_HOST_PATH
    [done] = pod["containers"]
    held = build_parser().parse_args(done["command"][3:])
    assert held.role == "uninstall" and held.hold and not held.cache_dir
    [role] = [o for o in objs if o["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]


# --- priority classes -------------------------------------------------------------------------


def _priority_classes(objs: list[dict[str, Any]]) -> dict[str, str | None]:
    return {
        o["kind"]: o["spec"]["template"]["spec"].get("priorityClassName")
        for o in objs
        if o["kind"] in ("Deployment", "DaemonSet")
    }


def test_default_install_uses_the_critical_classes() -> None:
    objs = render(MANIFESTS) + load_yaml_docs(MANIFESTS / "agent" / "daemonset.yaml")
    assert _priority_classes(objs) == {
        "Deployment": "system-cluster-critical",
        "DaemonSet": "system-node-critical",
    }


def test_components_drop_the_priority_classes() -> None:
    objs = render(MANIFESTS) + load_yaml_docs(MANIFESTS / "agent" / "daemonset.yaml")
    for name in ("no-priority-class", "no-priority-class-agent"):
        objs = _apply_component(MANIFESTS / "components" / name, objs)
    assert _priority_classes(objs) == {"Deployment": None, "DaemonSet": None}
    for obj in objs:
        if obj["kind"] in ("Deployment", "DaemonSet"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_quota_component_allows_the_critical_classes_in_our_namespace() -> None:
    objs = _apply_component(MANIFESTS / "components" / "critical-pods-quota", render(MANIFESTS))
    [quota] = [o for o in objs if o["kind"] == "ResourceQuota"]
    kubernetes_validate.validate(quota, K8S_VERSION, strict=True)
    [expr] = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert expr["scopeName"] == "PriorityClass" and expr["operator"] == "In"
    assert set(expr["values"]) == set(
        _priority_classes(
            render(MANIFESTS) + load_yaml_docs(MANIFESTS / "agent" / "daemonset.yaml")
        ).values()
    )
    assert quota["metadata"]["namespace"] == "modelcache-system"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_overlay_without_priority_classes_with_kubectl_kustomize() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS / "overlays" / "no-priority-class")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    objs = [o for o in yaml.safe_load_all(out) if o]
    assert _priority_classes(objs) == {"Deployment": None, "DaemonSet": None}
    assert "priorityClassName" not in out


# --- the license --------------------------------------------------------------------------


def test_license_file_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project.get("license")
    declared = declared if isinstance(declared, str) else (declared or {}).get("text", "")
    assert "Apache-2.0" in str(declared) or "Apache" in str(declared)
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text) > 10_000  # the full text, not a pointer to it


def test_the_agent_daemonset_bounds_the_cache_and_keeps_a_disk_floor() -> None:
    from sidecar.agent import settings_from_args
    from sidecar.disk import Size

    [ds] = load_yaml_docs(MANIFESTS / "agent" / "daemonset.yaml")
    [container] = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    argv = [a.replace("$(NODE_NAME)", "n1") for a in container["command"][3:] + container["args"]]
    settings = settings_from_args(build_parser().parse_args(argv))
    for size in (settings.max_bytes, settings.min_free):
        assert isinstance(size, Size) and size.resolve(1000) > 0  # never 0 = unlimited
    # the floor stays above the kubelet's default hard eviction threshold (10% free)
    assert settings.min_free.resolve(1000) > 100
