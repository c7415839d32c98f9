"""Decisions recorded as Kubernetes Events on the pod's owner (or the pod), through the real
``kubernetes`` client against the API stand-in, and never at the admission's expense: a
failing or hanging API server changes nothing about the answers, a full queue drops and
counts. Also: every log line about a review names the namespace, the pod and its owner."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from aiohttp import web

from tests.fixtures.kube_api import KubeApiServer
from tests.fixtures.webhook_server import make_app, make_review, model_pod, ready_client
from webhook.events import EventRecorder
from webhook.metrics import Metrics

EVENTS = "/api/v1/namespaces/ml/events"
OWNER = {
    "apiVersion": "apps/v1",
    "kind": "ReplicaSet",
    "name": "llm-7d9f",
    "uid": "6f1c2a8e-0000-4000-8000-000000000001",
    "controller": True,
}


def _owned(pod: dict[str, Any]) -> dict[str, Any]:
    pod["metadata"]["ownerReferences"] = [OWNER]
    return pod


def _detected_pod() -> dict[str, Any]:
    """No annotation: the model is detected from the args, which makes a warning."""
    pod = _owned(model_pod())
    del pod["metadata"]["annotations"]
    return pod


def _no_model_pod() -> dict[str, Any]:
    pod = _owned(model_pod())
    del pod["metadata"]["annotations"]
    pod["spec"]["containers"][0].update(image="nginx", args=["--port", "8000"])
    return pod


def _denied_pod() -> dict[str, Any]:
    pod = _owned(model_pod())
    pod["metadata"]["annotations"]["modelcache.io/affinity"] = "always"
    return pod


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else float(value)


async def _client(aiohttp_client: Any, kube_api: KubeApiServer, queue: int = 16) -> Any:
    metrics = Metrics()
    recorder = EventRecorder(kube_api.api_client, metrics, queue)
    client = await ready_client(aiohttp_client, make_app(metrics=metrics, events=recorder))
    client.metrics = metrics
    return client


async def _post(client: Any, pod: dict[str, Any], **kw: Any) -> dict[str, Any]:
    resp = await client.post("/mutate", json=make_review(pod, **kw))
    assert resp.status == 200
    document: dict[str, Any] = await resp.json()
    return document["response"]


async def _events(kube_api: KubeApiServer, count: int, within: float = 20.0) -> list[Any]:
    """The Event bodies POSTed so far, once there are ``count`` (bounded poll)."""
    deadline = time.monotonic() + within
    while True:
        posted = [r for r in kube_api.recorded("POST") if r.path == EVENTS and r.status]
        if len(posted) >= count or time.monotonic() > deadline:
            return [r.body for r in posted]
        await asyncio.sleep(0.02)


async def test_decisions_become_events_on_the_owner(
    aiohttp_client: Any, kube_api: KubeApiServer
) -> None:
    client = await _client(aiohttp_client, kube_api)
    assert (await _post(client, _detected_pod()))["allowed"] is True
    assert (await _post(client, _no_model_pod()))["allowed"] is True
    assert (await _post(client, _denied_pod()))["allowed"] is False
    events = await _events(kube_api, 3)
    by_reason = {e["reason"]: e for e in events}
    assert set(by_reason) == {"ModelcacheInjected", "ModelcacheSkipped", "ModelcacheDenied"}
    for event in events:
        assert event["involvedObject"] == {
            "kind": "ReplicaSet",
            "name": "llm-7d9f",
            "namespace": "ml",
            "apiVersion": "apps/v1",
            "uid": OWNER["uid"],
        }
        assert event["message"].startswith("pod llm-7d9f-: ")
        assert event["source"] == {"component": "modelcache-webhook"}
    injected = by_reason["ModelcacheInjected"]
    assert injected["type"] == "Normal"
    assert "warnings: detected model hf://org/model" in injected["message"]
    assert "no model" in by_reason["ModelcacheSkipped"]["message"]
    denied = by_reason["ModelcacheDenied"]
    assert denied["type"] == "Warning"
    assert "modelcache.io/affinity" in denied["message"]
    # the stand-in stored them where kubectl looks
    assert len([r for r in kube_api.recorded("POST") if r.status == 201]) == 3
    assert _sample(client.metrics, "modelcache_webhook_events_total", result="sent") == 3


async def test_a_pod_without_owner_gets_the_event_and_dry_runs_none(
    aiohttp_client: Any, kube_api: KubeApiServer
) -> None:
    client = await _client(aiohttp_client, kube_api)
    await _post(client, model_pod(name="llm-0"), dry_run=True)
    await _post(client, model_pod(name="llm-1"))
    (event,) = await _events(kube_api, 1)
    assert event["involvedObject"]["kind"] == "Pod"
    assert event["involvedObject"]["name"] == "llm-1"
    await client.post("/mutate", json=make_review(model_pod(name="llm-2")))
    assert len(await _events(kube_api, 2)) == 2  # the dry run made none, in order


async def test_a_failing_api_server_changes_no_answer(
    aiohttp_client: Any, kube_api: KubeApiServer
) -> None:
    kube_api.fail_next(1, "500", method="POST", path=EVENTS)
    client = await _client(aiohttp_client, kube_api)
    response = await _post(client, _detected_pod())
    assert response["allowed"] is True and response["patch"]
    for _ in range(1000):  # bounded wait for the worker to try
        if _sample(client.metrics, "modelcache_webhook_events_total", result="failed"):
            break
        await asyncio.sleep(0.02)
    assert _sample(client.metrics, "modelcache_webhook_events_total", result="failed") == 1


async def test_a_hanging_api_server_never_slows_admissions(
    aiohttp_client: Any, kube_api: KubeApiServer
) -> None:
    release = threading.Event()
    arrived = threading.Event()

    async def hang(request: web.Request) -> web.StreamResponse | None:
        arrived.set()
        await asyncio.to_thread(release.wait, 30)
        return None

    kube_api.add_hook(hang)
    client = await _client(aiohttp_client, kube_api, queue=2)
    try:
        await _post(client, _detected_pod())
        assert await asyncio.to_thread(arrived.wait, 20)  # the worker is stuck on the API
        latencies = []
        for _ in range(10):
            t0 = time.monotonic()
            response = await _post(client, _detected_pod())
            latencies.append(time.monotonic() - t0)
            assert response["allowed"] is True and response["patch"]
        assert max(latencies) < 0.5, latencies
        # one event in the stuck call, two queued, the other eight dropped and counted
        assert _sample(client.metrics, "modelcache_webhook_events_total", result="dropped") == 8
    finally:
        release.set()


async def test_every_review_log_line_names_pod_owner_and_uid(
    webhook_client: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.admission")
    for pod in (_detected_pod(), _no_model_pod(), _denied_pod()):
        resp = await webhook_client.post("/mutate", json=make_review(pod, uid="uid-42"))
        assert resp.status == 200
    lines = [r for r in caplog.records if r.name == "webhook.admission"]
    assert len(lines) == 3  # one INFO line per review
    for record in lines:
        assert record.levelno == logging.INFO
        assert record.uid == "uid-42"
        assert record.namespace == "ml"
        assert record.pod == "llm-7d9f-"
        assert (record.owner_kind, record.owner_name) == ("ReplicaSet", "llm-7d9f")
        for field in ("decision", "mutations", "patch_bytes", "duration_ms"):
            assert hasattr(record, field)
