"""Event-driven pre-warm against the Kubernetes API stand-in, with real fetches from nginx.

Ten node agents (one per node, each with its own node cache) read the same cluster: an
opted-in Deployment scales from 2 to 5 replicas, and exactly the three nodes its new pods
most likely land on fetch the model (not the full, cordoned, tainted, mismatched or already
warm ones); an injected pod bound to a node makes that node's agent fetch its models before
the pod starts, and the lead time is measured when it starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.agent import Agent, AgentSettings, RetryPolicy
from sidecar.modelsource import parse_model_arg
from sidecar.node.watcher import PREWARM_ANNOTATION
from tests.fixtures.kube_api import KubeApiServer
from tests.fixtures.servers import ServedModel, nginx_bytes_sent

REPO_ROOT = Path(__file__).resolve().parents[2]
NS = "ml"
DEPLOY = f"/apis/apps/v1/namespaces/{NS}/deployments/llm"
GPU = "nvidia.com/gpu"


def _node(
    name: str,
    *,
    gpus: int,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    unschedulable: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"gpu": "a100", **(labels or {})}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {"allocatable": {GPU: str(gpus), "cpu": "32"}},
    }


def _pod(name: str, node: str, *, gpus: int = 1, app: str = "llm", **extra: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "resources": {"limits": {GPU: str(gpus)}}}],
        },
        "status": {"phase": "Running"},
    }
    for key, value in extra.items():
        pod[key] = {**pod.get(key, {}), **value}
    return pod


def _metric(agent: Agent, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(agent.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.fixture
def cluster(kube_api: KubeApiServer, nginx_model: ServedModel) -> Iterator[KubeApiServer]:
    key = parse_model_arg(f"llm={nginx_model.url}").source.cache_key
    warm = {f"cache.modelcache.io/{key}": "ready"}
    nodes = [
        _node("node-01", gpus=1, labels=warm),  # holds the model, runs a replica
        _node("node-02", gpus=1, labels=warm),  # holds the model, runs a replica
        _node("node-03", gpus=2),  # two free GPUs: first choice
        _node("node-04", gpus=1),
        _node("node-05", gpus=1),  # its GPU is taken by another workload
        _node("node-06", gpus=1, taints=[{"key": "team", "value": "b", "effect": "NoSchedule"}]),
        _node("node-07", gpus=4, labels={"gpu": "t4"}),  # nodeSelector gpu=a100 excludes it
        _node("node-08", gpus=4, unschedulable=True),  # cordoned
        _node("node-09", gpus=1, taints=[{"key": GPU, "effect": "NoSchedule"}]),  # tolerated
        _node("node-10", gpus=1),  # fits, but loses the tie on its name
    ]
    for node in nodes:
        kube_api.put(f"/api/v1/nodes/{node['metadata']['name']}", node)
    for pod in (
        _pod("llm-a", "node-01"),
        _pod("llm-b", "node-02"),
        _pod("other", "node-05", app="other"),
        _pod("done", "node-04", status={"phase": "Succeeded"}),  # holds no GPU any more
    ):
        kube_api.put(f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}", pod)
    kube_api.put(
        DEPLOY,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "llm",
                "namespace": NS,
                "annotations": {PREWARM_ANNOTATION: "true"},
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "llm"}},
                "template": {
                    "metadata": {
                        "labels": {"app": "llm"},
                        "annotations": {"modelcache.io/model": f"llm={nginx_model.url}"},
                    },
                    "spec": {
                        "nodeSelector": {"gpu": "a100"},
                        "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
                        "containers": [{"name": "vllm", "resources": {"limits": {GPU: "1"}}}],
                    },
                },
            },
        },
    )
    return kube_api


def _agents(tmp_path: Path, api: KubeApiServer, names: list[str]) -> dict[str, Agent]:
    return {
        name: Agent(
            AgentSettings(
                cache_dir=tmp_path / name,
                node=name,
                watch=True,
                retry=RetryPolicy(attempts=2, base=0.01, cap=0.05),
            ),
            api.api_client(),
        )
        for name in names
    }


async def _watch_all(agents: dict[str, Agent]) -> dict[str, list[str]]:
    started = {name: await agent.watch_pass() for name, agent in agents.items()}
    for agent in agents.values():
        assert await agent.wait_prewarm()
    return {name: s for name, s in started.items() if s}


async def test_scale_out_warms_exactly_the_nodes_new_pods_land_on(
    tmp_path: Path, cluster: KubeApiServer, nginx_model: ServedModel
):
    names = [f"node-{i:02d}" for i in range(1, 11)]
    agents = _agents(tmp_path, cluster, names)
    model = parse_model_arg(f"llm={nginx_model.url}")
    try:
        # two replicas, two warm nodes: nothing to do
        assert await _watch_all(agents) == {}

        deploy = cluster.get(DEPLOY)
        assert deploy is not None
        deploy["spec"]["replicas"] = 5
        cluster.put(DEPLOY, deploy)
        before = nginx_bytes_sent(nginx_model.server, path_contains="tiny-llama")
        started = await _watch_all(agents)

        assert sorted(started) == ["node-03", "node-04", "node-09"]
        warmed = sorted(n for n, a in agents.items() if a.cache.is_complete(model))
        assert warmed == ["node-03", "node-04", "node-09"]
        sent = nginx_bytes_sent(nginx_model.server, path_contains="tiny-llama") - before
        assert sent == 3 * nginx_model.info.total_bytes
        plan = agents["node-03"].last_plans[0]
        assert (plan.desired, plan.holders, plan.candidates) == (5, 2, 4)
        # every agent computed the same plan, without a leader
        assert {a.last_plans[0].nodes for a in agents.values()} == {plan.nodes}
        for name in started:
            a = agents[name]
            assert _metric(a, "modelcache_prewarm_starts_total", trigger="scale-out") == 1
            assert _metric(a, "modelcache_fetch_bytes_total", via="origin") == (
                nginx_model.info.total_bytes
            )
            assert _metric(a, "modelcache_fetch_duration_seconds_count", trigger="scale-out") == 1

        # the warmed nodes label themselves; then the plan is satisfied and stays quiet
        for name in started:
            assert (await agents[name].run_pass()).ok
            assert _metric(agents[name], "modelcache_model_ready", model=model.source.cache_key)
        assert await _watch_all(agents) == {}
        assert agents["node-01"].last_plans[0].holders == 5
    finally:
        for agent in agents.values():
            await agent.close()


async def test_hpa_desired_replicas_drive_the_plan(
    tmp_path: Path, cluster: KubeApiServer, nginx_model: ServedModel
):
    """An opted-in HPA stands for its target: its desiredReplicas count, not spec.replicas
    (the Deployment itself is not opted in here)."""
    deploy = cluster.get(DEPLOY)
    assert deploy is not None
    deploy["metadata"]["annotations"] = {}
    cluster.put(DEPLOY, deploy)
    cluster.put(
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/llm",
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {
                "name": "llm",
                "namespace": NS,
                "annotations": {PREWARM_ANNOTATION: "true"},
            },
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
                "minReplicas": 2,
                "maxReplicas": 10,
            },
            "status": {"desiredReplicas": 3, "currentReplicas": 2},
        },
    )
    agents = _agents(tmp_path, cluster, ["node-03", "node-04", "node-10"])
    try:
        assert sorted(await _watch_all(agents)) == ["node-03"]
    finally:
        for agent in agents.values():
            await agent.close()


async def test_bound_pod_is_fetched_before_it_starts_and_lead_time_measured(
    tmp_path: Path, cluster: KubeApiServer, nginx_model: ServedModel
):
    model = parse_model_arg(f"llm={nginx_model.url}")
    status = {
        "version": 2,
        "models": [{"name": "llm", "uri": model.source.uri, "cacheKey": model.source.cache_key}],
        "include": [],
    }
    path = f"/api/v1/namespaces/{NS}/pods/llm-new"
    injected = {
        "labels": {"app": "llm", "modelcache.io/injected": "true"},
        "annotations": {"modelcache.io/status": json.dumps(status)},
    }
    pod = _pod("llm-new", "node-10", metadata=injected, status={"phase": "Pending"})
    cluster.put(path, pod)
    # already running elsewhere: too late for pre-warm, left to its own warm-up
    running = _pod("llm-old", "node-04", metadata={**injected, "name": "llm-old"})
    cluster.put(f"/api/v1/namespaces/{NS}/pods/llm-old", running)
    deploy = cluster.get(DEPLOY)
    assert deploy is not None
    deploy["metadata"]["annotations"] = {}  # only the pod signal in this test
    cluster.put(DEPLOY, deploy)

    agents = _agents(tmp_path, cluster, ["node-04", "node-10"])
    try:
        started = await _watch_all(agents)
        assert started == {"node-10": [f"llm={model.source.uri}"]}
        node10 = agents["node-10"]
        assert node10.cache.is_complete(model)
        assert not agents["node-04"].cache.is_complete(model)
        assert _metric(node10, "modelcache_prewarm_starts_total", trigger="pod") == 1

        # the kubelet starts the pod later: its model was ready before, a positive lead
        ready_at = node10.cache.model_dir(model).manifest.stat().st_mtime
        pod = cluster.get(path)
        assert pod is not None
        start = datetime.fromtimestamp(ready_at + 42, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        pod["status"] = {"phase": "Pending", "startTime": start}
        cluster.put(path, pod)
        assert await node10.watch_pass() == []  # complete: nothing fetched again
        assert _metric(node10, "modelcache_prewarm_lead_seconds_count") == 1
        # 42 s ahead (whole seconds in startTime): in the (30, 60] bucket
        bucket = "modelcache_prewarm_lead_seconds_bucket"
        assert _metric(node10, bucket, le="30.0") == 0
        assert _metric(node10, bucket, le="60.0") == 1
        assert await node10.watch_pass() == []
        assert _metric(node10, "modelcache_prewarm_lead_seconds_count") == 1  # once per pod
    finally:
        for agent in agents.values():
            await agent.close()


async def test_cluster_read_errors_are_counted_and_nothing_starts(
    tmp_path: Path, cluster: KubeApiServer
):
    agents = _agents(tmp_path, cluster, ["node-03"])
    deploy = cluster.get(DEPLOY)
    assert deploy is not None
    deploy["spec"]["replicas"] = 5
    cluster.put(DEPLOY, deploy)
    cluster.fail_next(1, "500", method="GET", path="/apis/apps/v1/deployments")
    cluster.fail_next(1, "drop", method="GET", path="/api/v1/nodes")
    try:
        assert await agents["node-03"].watch_pass() == []
        assert await agents["node-03"].watch_pass() == []
        assert _metric(agents["node-03"], "modelcache_prewarm_watch_errors_total") == 2
        # the faults are gone: the next pass warms the node
        assert len(await agents["node-03"].watch_pass()) == 1
        assert await agents["node-03"].wait_prewarm()
    finally:
        await agents["node-03"].close()


def test_agent_cli_prewarm_watch_once_fetches_a_bound_pods_model(
    tmp_path: Path, cluster: KubeApiServer, nginx_model: ServedModel
):
    """``python -m sidecar agent --once --prewarm-watch`` as a process: one watch pass, the
    bound pod's model fetched, the node labelled with it, exit 0."""
    model = parse_model_arg(f"llm={nginx_model.url}")
    status = {"version": 2, "models": [{"name": "llm", "uri": model.source.uri}]}
    injected = {
        "labels": {"modelcache.io/injected": "true"},
        "annotations": {"modelcache.io/status": json.dumps(status)},
    }
    pod = _pod("bound", "node-08", metadata=injected, status={"phase": "Pending"})
    cluster.put(f"/api/v1/namespaces/{NS}/pods/bound", pod)
    env = dict(os.environ, KUBECONFIG=str(cluster.write_kubeconfig(tmp_path / "kubeconfig")))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cache = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "agent", "--cache-dir", str(cache), "--node",
         "node-08", "--once", "--min-free", "0", "--prewarm-watch"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    labels = cluster.get("/api/v1/nodes/node-08")["metadata"]["labels"]  # type: ignore[index]
    assert labels.get(f"cache.modelcache.io/{model.source.cache_key}") == "ready"
    assert "pod ml/bound bound to node-08" in done.stderr
