"""The fleet signals shipped as examples: the KEDA ScaledObject (``examples/keda/``) and the
Grafana dashboard (``examples/grafana/``).

Both parse; the ScaledObject validates against a schema written from KEDA's ScaledObject CRD
(``keda.sh/v1alpha1``: the fields of ``scaledobject_types.go`` and the prometheus scaler's
metadata), strict about unknown keys so a typo (``minReplicas``) fails here and not silently
in a cluster; every metric name in their PromQL is one the agent or the webhook exports
(read from their registries, as for the alert rules).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit.test_ops_manifests import exported_names, metric_names_in

ROOT = Path(__file__).resolve().parents[2]
SCALED_OBJECT = ROOT / "examples" / "keda" / "scaledobject.yaml"
DASHBOARD = ROOT / "examples" / "grafana" / "modelcache-dashboard.json"

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "tolerance": {"type": ["string", "number"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
#: Metadata of the prometheus scaler (all values are strings in a ScaledObject).
_PROMETHEUS_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["serverAddress", "query", "threshold"],
    "properties": {
        k: _STR
        for k in (
            "serverAddress",
            "query",
            "threshold",
            "activationThreshold",
            "namespace",
            "customHeaders",
            "ignoreNullValues",
            "queryParameters",
            "unsafeSsl",
            "timeout",
            "authModes",
        )
    },
}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": _STR,
                "labels": _STR_MAP,
                "annotations": _STR_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": _STR,
                        "kind": _STR,
                        "name": _STR,
                        "envSourceContainerName": _STR,
                    },
                },
                "pollingInterval": _INT32,
                "cooldownPeriod": _INT32,
                "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32,
                "minReplicaCount": _INT32,
                "maxReplicaCount": _INT32,
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": _INT32,
                        "replicas": _INT32,
                        "behavior": {
                            "enum": ["static", "currentReplicas", "currentReplicasIfHigher"]
                        },
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": _STR,
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES},
                                },
                            },
                        },
                        "scalingModifiers": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "formula": _STR,
                                "target": _STR,
                                "activationTarget": _STR,
                                "metricType": {"enum": ["AverageValue", "Value"]},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": _STR,
                            "name": _STR,
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": _STR_MAP,
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": _STR,
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                        # a prometheus trigger's metadata follows the scaler's own fields
                        "if": {"properties": {"type": {"const": "prometheus"}}},
                        "then": {"properties": {"metadata": _PROMETHEUS_METADATA}},
                    },
                },
            },
        },
    },
}


def _scaled_object() -> dict[str, Any]:
    [doc] = [d for d in yaml.safe_load_all(SCALED_OBJECT.read_text()) if d]
    return doc


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _validate(doc: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCALED_OBJECT_SCHEMA)
    jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA).validate(doc)


def test_scaled_object_validates_against_the_keda_schema() -> None:
    doc = _scaled_object()
    _validate(doc)
    spec = doc["spec"]
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "minReplicas"), 1),  # the HPA's name for it, not KEDA's
        (("spec", "triggers", 0, "metadata", "treshold"), "1"),
        (("spec", "triggers", 0, "metadata", "threshold"), 1),  # metadata values are strings
        (("spec", "pollingInterval"), "15s"),
        (("spec", "triggers", 0, "metricType"), "Average"),
    ],
)
def test_the_schema_rejects_typos(path: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(_scaled_object())
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc)


def test_scaled_object_reads_only_exported_metrics_of_the_examples_model() -> None:
    doc = _scaled_object()
    names = exported_names()
    queries = [t["metadata"]["query"] for t in doc["spec"]["triggers"]]
    assert queries
    for query in queries:
        used = metric_names_in(query)
        assert used and used <= names, used - names
    # it scales the vLLM example, on the cache key the webhook gives that example's model
    inject = subprocess.run(
        [sys.executable, "-m", "webhook", "inject", "-f", str(ROOT / "examples" / "vllm.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    [deployment] = [d for d in yaml.safe_load_all(inject.stdout) if d]
    assert doc["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    status = json.loads(
        deployment["spec"]["template"]["metadata"]["annotations"]["modelcache.io/status"]
    )
    [key] = [m["cacheKey"] for m in status["models"]]
    assert all(f'model="{key}"' in q for q in queries)


def test_dashboard_panels_are_well_formed() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    panels = dash["panels"]
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    templating = {t["name"]: t for t in dash["templating"]["list"]}
    assert templating["datasource"]["type"] == "datasource"
    for p in panels:
        assert p["type"] in ("timeseries", "stat", "gauge", "bargauge", "table")
        assert set(p["gridPos"]) == {"h", "w", "x", "y"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]


def test_dashboard_reads_only_exported_metrics_and_shows_the_fleet_signals() -> None:
    names = exported_names()
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    used: set[str] = set()
    for expr in exprs:
        found = metric_names_in(expr)
        assert found, expr
        assert found <= names, (expr, found - names)
        used |= found
    assert {
        "modelcache_model_ready",
        "modelcache_fetch_bytes_total",
        "modelcache_fetch_duration_seconds_bucket",
        "modelcache_prewarm_lead_seconds_bucket",
    } <= used


def test_a_renamed_metric_in_the_dashboard_would_be_caught() -> None:
    assert not metric_names_in("sum by (model) (modelcache_models_ready)") <= exported_names()
