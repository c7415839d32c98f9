"""The pre-warm watcher's decisions (``sidecar.node.watcher``): pure functions, raw objects
in, nodes and models out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.agent import AgentMetrics
from sidecar.modelsource import parse_model_arg
from sidecar.node import watcher
from sidecar.node.watcher import (
    PREWARM_ANNOTATION,
    Workload,
    bound_pods,
    collect_workloads,
    node_fit,
    plan_scale_out,
    pod_gpus,
    status_models,
)

GPU = "nvidia.com/gpu"
URI = "hf://acme/llm@main"
KEY = parse_model_arg(f"llm={URI}").source.cache_key


def _status(*models: tuple[str, str], include: list[str] | None = None) -> str:
    return json.dumps(
        {"version": 2, "models": [{"name": n, "uri": u} for n, u in models], "include": include}
    )


def _pod(node: str | None = "n1", *, injected: bool = True, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "namespace": "ml",
            "uid": "u1",
            "labels": {"modelcache.io/injected": "true"} if injected else {},
            "annotations": {"modelcache.io/status": _status(("llm", URI))},
        },
        "spec": {"nodeName": node} if node else {},
        "status": status,
    }


def _node(name: str, **kw: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": kw.pop("labels", {})},
        "spec": kw.pop("spec", {}),
        "status": {"allocatable": kw.pop("allocatable", {GPU: "1"})},
    }


# --- status and bound pods ------------------------------------------------------------------


def test_status_models_reads_models_and_include():
    pod = _pod()
    pod["metadata"]["annotations"]["modelcache.io/status"] = _status(
        ("llm", URI), ("lora", "s3://adapters/lora"), include=["*.json", ""]
    )
    found = status_models(pod)
    assert found is not None
    models, include = found
    assert [m.to_arg() for m in models] == [f"llm={URI}", "lora=s3://adapters/lora/"]
    assert include == ("*.json",)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "not json",
        "[]",
        '{"models": [{"name": "x"}]}',
        '{"models": [{"name": "x", "uri": "ftp://a"}]}',
        '{"models": []}',
    ],
)
def test_status_models_unreadable_is_none(raw: str | None):
    pod = _pod()
    if raw is None:
        del pod["metadata"]["annotations"]["modelcache.io/status"]
    else:
        pod["metadata"]["annotations"]["modelcache.io/status"] = raw
    assert status_models(pod) is None


@pytest.mark.parametrize(
    ("pod", "picked"),
    [
        (_pod(), True),
        (_pod(phase="Pending"), True),
        (_pod(phase="Pending", containerStatuses=[{"state": {"waiting": {}}}]), True),
        (_pod(phase="Pending", containerStatuses=[{"state": {"running": {}}}]), False),
        (_pod(phase="Running"), False),
        (_pod(phase="Succeeded"), False),
        (_pod("n2"), False),
        (_pod(None), False),
        (_pod(injected=False), False),
    ],
)
def test_bound_pods(pod: dict[str, Any], picked: bool):
    assert (bound_pods([pod], "n1") == [pod]) is picked


def test_a_pod_being_deleted_is_not_warmed():
    pod = _pod()
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert bound_pods([pod], "n1") == []


def test_pod_start_parses_rfc3339():
    start = watcher.pod_start(_pod(startTime="2026-03-04T05:06:07Z"))
    assert start is not None and start.isoformat() == "2026-03-04T05:06:07+00:00"
    assert watcher.pod_start(_pod(startTime="yesterday")) is None


# --- resources and fit ----------------------------------------------------------------------


def test_pod_gpus_requests_limits_and_init_containers():
    spec = {
        "containers": [
            {"resources": {"limits": {GPU: "2"}}},
            {"resources": {"limits": {GPU: "4"}, "requests": {GPU: "1"}, "cpu": "1"}},
            {"resources": {"limits": {"amd.com/gpu": "1", "memory": "1Gi"}}},
        ],
        "initContainers": [{"resources": {"limits": {GPU: "8"}}}],
    }
    assert pod_gpus(spec) == {GPU: 8.0, "amd.com/gpu": 1.0}
    assert pod_gpus({"containers": [{"name": "x"}]}) == {}


SPEC = {
    "nodeSelector": {"pool": "gpu"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["x"]}]},
                ]
            }
        }
    },
    "tolerations": [{"key": "gpu", "operator": "Exists"}],
    "containers": [{"resources": {"limits": {GPU: "2"}}}],
}
OK_LABELS = {"pool": "gpu", "zone": "a"}


@pytest.mark.parametrize(
    ("node", "used", "reason"),
    [
        (_node("n", labels=OK_LABELS, allocatable={GPU: "2"}), {}, ""),
        (_node("n", labels=OK_LABELS, allocatable={GPU: "2"}), {GPU: 1.0}, "nvidia.com/gpu"),
        (_node("n", labels=OK_LABELS, allocatable={}), {}, "nvidia.com/gpu: 0 free"),
        (_node("n", labels={"zone": "a"}, allocatable={GPU: "2"}), {}, "nodeSelector"),
        (_node("n", labels={"pool": "gpu", "zone": "b"}, allocatable={GPU: "2"}), {}, "affinity"),
        # the second term (matchFields on the name) ORs with the first
        (_node("x", labels={"pool": "gpu", "zone": "b"}, allocatable={GPU: "2"}), {}, ""),
        (
            _node("n", labels=OK_LABELS, allocatable={GPU: "2"}, spec={"unschedulable": True}),
            {},
            "unschedulable",
        ),
        (
            _node(
                "n",
                labels=OK_LABELS,
                allocatable={GPU: "2"},
                spec={"taints": [{"key": "gpu", "value": "x", "effect": "NoSchedule"}]},
            ),
            {},
            "",
        ),
        (
            _node(
                "n",
                labels=OK_LABELS,
                allocatable={GPU: "2"},
                spec={"taints": [{"key": "team", "effect": "NoExecute"}]},
            ),
            {},
            "taint team:NoExecute",
        ),
        (
            _node(
                "n",
                labels=OK_LABELS,
                allocatable={GPU: "2"},
                spec={"taints": [{"key": "team", "effect": "PreferNoSchedule"}]},
            ),
            {},
            "",
        ),
    ],
)
def test_node_fit(node: dict[str, Any], used: dict[str, float], reason: str):
    got = node_fit(node, SPEC, used)
    assert (got == "") if not reason else (reason in got), got


@pytest.mark.parametrize(
    ("op", "values", "labels", "match"),
    [
        ("NotIn", ["a"], {"k": "b"}, True),
        ("NotIn", ["a"], {}, True),
        ("NotIn", ["a"], {"k": "a"}, False),
        ("Exists", [], {"k": ""}, True),
        ("DoesNotExist", [], {"k": "x"}, False),
        ("Gt", ["3"], {"k": "4"}, True),
        ("Lt", ["3"], {"k": "4"}, False),
        ("Gt", ["3"], {"k": "four"}, False),
        ("Bogus", ["3"], {"k": "4"}, False),
    ],
)
def test_affinity_operators(op: str, values: list[str], labels: dict[str, str], match: bool):
    spec = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "k", "operator": op, "values": values}]}
                    ]
                }
            }
        }
    }
    assert (node_fit(_node("n", labels=labels), spec, {}) == "") is match


def test_toleration_value_and_effect_must_match():
    taint = {"key": "team", "value": "a", "effect": "NoSchedule"}
    node = _node("n", spec={"taints": [taint]})
    wrong_value = {"tolerations": [{"key": "team", "operator": "Equal", "value": "b"}]}
    wrong_effect = {"tolerations": [{"key": "team", "value": "a", "effect": "NoExecute"}]}
    everything = {"tolerations": [{"operator": "Exists"}]}
    assert node_fit(node, wrong_value, {})
    assert node_fit(node, wrong_effect, {})
    assert node_fit(node, everything, {}) == ""


# --- workloads and plans --------------------------------------------------------------------


def _deployment(name: str, replicas: int | None, *, opted: bool = True, model: bool = True) -> Any:
    template: dict[str, Any] = {"metadata": {"labels": {"app": name}}, "spec": {}}
    if model:
        template["metadata"]["annotations"] = {
            "modelcache.io/model": f"llm={URI}",
            "modelcache.io/warmup-include": "*.json, *.safetensors",
        }
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": name}}, "template": template}
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "annotations": {PREWARM_ANNOTATION: "true"} if opted else {},
        },
        "spec": spec,
    }


def test_collect_workloads_kinds_and_counts():
    hpa = {
        "metadata": {"name": "h", "namespace": "ml", "annotations": {PREWARM_ANNOTATION: "true"}},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "b"}, "minReplicas": 2},
        "status": {"desiredReplicas": 7},
    }
    orphan_hpa = {
        "metadata": {"name": "o", "namespace": "ml", "annotations": {PREWARM_ANNOTATION: "true"}},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "missing"}},
    }
    lws = {
        "metadata": {"name": "big", "namespace": "ml", "annotations": {PREWARM_ANNOTATION: "True"}},
        "spec": {
            "replicas": 2,
            "leaderWorkerTemplate": {
                "size": 4,
                "workerTemplate": {
                    "metadata": {"annotations": {"modelcache.io/model": f"m={URI}"}}
                },
            },
        },
    }
    got = collect_workloads(
        deployments=[_deployment("a", 3), _deployment("b", 1, opted=False)],
        statefulsets=[_deployment("s", None)],
        hpas=[hpa, orphan_hpa],
        leaderworkersets=[lws],
    )
    summary = {(w.kind, w.name): (w.desired, [m.name for m in w.models]) for w in got}
    assert summary == {
        ("Deployment", "a"): (3, ["llm"]),
        ("Deployment", "b"): (7, ["llm"]),  # through its HPA
        ("StatefulSet", "s"): (1, ["llm"]),  # no replicas: 1
        ("LeaderWorkerSet", "big"): (8, ["m"]),  # 2 groups of 4 pods
    }
    assert next(w for w in got if w.name == "a").include == ("*.json", "*.safetensors")


def test_models_from_the_workloads_pods_when_the_template_names_none():
    pod = _pod()
    pod["metadata"]["labels"]["app"] = "a"
    other_ns = _pod()
    other_ns["metadata"].update(namespace="elsewhere")
    other_ns["metadata"]["labels"]["app"] = "a"
    (w,) = collect_workloads(deployments=[_deployment("a", 2, model=False)], pods=[pod])
    assert [m.to_arg() for m in w.models] == [f"llm={URI}"]
    (w,) = collect_workloads(deployments=[_deployment("a", 2, model=False)], pods=[other_ns])
    assert w.models == []


def _workload(desired: int, spec: dict[str, Any] | None = None) -> Workload:
    return Workload(
        "Deployment",
        "ml",
        "a",
        desired,
        {"spec": spec or {"containers": [{"resources": {"limits": {GPU: "1"}}}]}},
        [parse_model_arg(f"llm={URI}")],
    )


def test_plan_ranks_by_free_gpus_then_name_and_skips_holders():
    nodes = [
        _node("warm", labels={f"cache.modelcache.io/{KEY}": "ready"}),
        _node("c", allocatable={GPU: "1"}),
        _node("b", allocatable={GPU: "1"}),
        _node("a", allocatable={GPU: "4"}),
        _node("full", allocatable={GPU: "1"}),
    ]
    pods = [{"spec": {"nodeName": "full", "containers": [{"resources": {"limits": {GPU: "1"}}}]}}]
    plan = plan_scale_out(_workload(3), nodes, pods)
    assert plan.nodes == ("a", "b")
    assert (plan.desired, plan.holders, plan.candidates) == (3, 1, 3)
    assert plan_scale_out(_workload(1), nodes, pods).nodes == ()
    # a partial label (not "ready") is not a holder
    nodes[0]["metadata"]["labels"][f"cache.modelcache.io/{KEY}"] = "filling"
    assert plan_scale_out(_workload(1), nodes, pods).nodes == ("a",)


def test_plan_without_models_warms_nothing():
    w = _workload(5)
    w.models = []
    assert plan_scale_out(w, [_node("a")]).nodes == ()


def test_decide_puts_bound_pods_first():
    view = watcher.ClusterView(
        pods=[_pod()],
        nodes=[_node("n1")],
        deployments=[_deployment("a", 1)],
    )
    wanted, plans = watcher.decide(view, "n1")
    assert [w.trigger for w in wanted] == ["pod", "scale-out"]
    assert plans[0].nodes == ("n1",)


# --- metrics --------------------------------------------------------------------------------


def test_origin_bytes_are_what_other_vias_do_not_account_for():
    m = AgentMetrics()
    m.count_fetch("dragonfly", 70)
    m.count_fetch("origin", 1000)  # ignored: origin is derived
    m.count_fetch("bogus", 5)  # ignored: not a via
    m.settle_origin(100)
    m.count_fetch("peer", 50)
    m.settle_origin(40)  # reported ahead of the engine's count: never negative
    text = m.render().decode()
    assert 'modelcache_fetch_bytes_total{via="dragonfly"} 70.0' in text
    assert 'modelcache_fetch_bytes_total{via="peer"} 50.0' in text
    assert 'modelcache_fetch_bytes_total{via="origin"} 30.0' in text
    m.settle_origin(60)  # 200 written, 120 elsewhere
    assert 'modelcache_fetch_bytes_total{via="origin"} 80.0' in m.render().decode()


def test_no_gauge_is_named_total():
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(AgentMetrics().render().decode()))
    gauges = [f.name for f in families if f.type == "gauge"]
    assert gauges and not [g for g in gauges if g.endswith("_total")]


# --- the manifests component ----------------------------------------------------------------


def test_the_component_turns_the_watch_on_with_exactly_the_access_it_reads() -> None:
    from pathlib import Path

    import kubernetes_validate

    from sidecar.__main__ import build_parser
    from tests.fixtures.kustomize import _apply_component
    from tests.unit.test_agent_manifests import load_resources

    component = Path(__file__).resolve().parents[2] / "manifests" / "components" / "prewarm-watch"
    objs = _apply_component(component, load_resources())
    [ds] = [o for o in objs if o["kind"] == "DaemonSet"]
    container = ds["spec"]["template"]["spec"]["containers"][0]
    parsed = build_parser().parse_args(container["command"][3:] + container["args"])
    assert parsed.prewarm_watch is True
    [role] = [o for o in objs if o["kind"] == "ClusterRole" and "watch" in o["metadata"]["name"]]
    kubernetes_validate.validate(role, "1.30", strict=True)
    granted = set()
    for rule in role["rules"]:
        assert rule["verbs"] == ["list"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.add(f"/apis/{group}/{resource}" if group else f"/api/v1/{resource}")
    # every collection the watcher lists is granted, and nothing more
    read = set()
    for _, path in watcher.COLLECTIONS:
        parts = path.strip("/").split("/")
        read.add(f"/api/v1/{parts[-1]}" if parts[0] == "api" else f"/apis/{parts[1]}/{parts[-1]}")
    assert granted == read
    [binding] = [
        o
        for o in objs
        if o["kind"] == "ClusterRoleBinding" and o["roleRef"]["name"] == role["metadata"]["name"]
    ]
    assert binding["subjects"][0]["name"] == "modelcache-agent"


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--prewarm-watch-interval", "0"], "--prewarm-watch-interval 0.0: must be positive"),
        (
            ["--dragonfly-socket", "dfdaemon.sock"],
            "--dragonfly-socket dfdaemon.sock: must be an absolute path",
        ),
    ],
)
def test_agent_flags_are_checked(flags: list[str], error: str) -> None:
    from sidecar.__main__ import build_parser
    from sidecar.agent import settings_from_args

    args = build_parser().parse_args(["agent", "--cache-dir", "/c", "--node", "n", *flags])
    with pytest.raises(ValueError, match=error.replace(".", r"\.")):
        settings_from_args(args)


def test_agent_flags_reach_the_settings() -> None:
    from sidecar.__main__ import build_parser
    from sidecar.agent import settings_from_args

    args = build_parser().parse_args(
        ["agent", "--cache-dir", "/c", "--node", "n", "--prewarm-watch",
         "--prewarm-watch-interval", "2.5", "--dragonfly-socket", "/run/dfdaemon.sock"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert (settings.watch, settings.watch_interval, settings.dragonfly_socket) == (
        True,
        2.5,
        "/run/dfdaemon.sock",
    )
