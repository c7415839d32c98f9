"""POST /mutate over the aiohttp test client: every point of the AdmissionReview contract."""

from __future__ import annotations

import asyncio
import base64
import copy
import gzip
import json
import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from typing import Any

import jsonpatch
import pytest

from tests.fixtures.webhook_server import (
    make_app,
    make_review,
    model_pod,
    ready_client,
    wait_ready,
)
from webhook.config import Config
from webhook.state import STATE

JSON_HEADERS = {"Content-Type": "application/json"}


async def _post(client: Any, doc: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/mutate", data=json.dumps(doc), headers=JSON_HEADERS, **kw)
    return resp.status, await resp.json()


def _patched(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(copy.deepcopy(pod), patch)


def _large_pod() -> dict[str, Any]:
    pod = model_pod()
    pod["metadata"]["managedFields"] = [
        {
            "manager": f"m{i}",
            "operation": "Update",
            "apiVersion": "v1",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}},
        }
        for i in range(200)
    ]
    return pod


def check_pod(pod: dict[str, Any]) -> None:
    """Schema (strict) and API-server rules the schema cannot express."""
    from tests.fixtures.podcheck import api_server_violations, validate_pod_strict

    validate_pod_strict(pod)
    assert api_server_violations(pod) == []


# --- malformed requests: 400 / 413 with a reason, never 5xx ----------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ("text/plain", b"{}", "content type must be application/json, got text/plain"),
        (None, b"{}", "content type must be application/json"),
        ("application/json", b"{not json", "body is not JSON"),
        ("application/json", b"", "body is not JSON"),
        ("application/json", b'"str"', "must be a JSON object"),
        ("application/json", b'{"apiVersion": "admission.k8s.io/v1"}', "kind: Field required"),
        (
            "application/json",
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            "request: Field required",
        ),
    ],
)
async def test_malformed_is_400_with_reason(
    webhook_client: Any, content_type: str | None, body: bytes, reason: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await webhook_client.post("/mutate", data=body, headers=headers)
    assert resp.status == 400
    payload = await resp.json()
    assert reason in payload["reason"]


async def test_missing_uid_is_400(webhook_client: Any) -> None:
    doc = make_review(model_pod())
    del doc["request"]["uid"]
    status, payload = await _post(webhook_client, doc)
    assert status == 400
    assert "request.uid: Field required" in payload["reason"]


async def test_pod_create_with_non_object_is_400(webhook_client: Any) -> None:
    status, payload = await _post(webhook_client, make_review("a string"))
    assert status == 400
    assert "request.object" in payload["reason"]


async def test_body_over_limit_is_413_by_content_length(aiohttp_client: Any) -> None:
    client = await ready_client(aiohttp_client, make_app(Config(max_request_bytes=4096)))
    pod = model_pod()
    pod["metadata"]["annotations"]["big"] = "x" * 5000
    status, payload = await _post(client, make_review(pod))
    assert status == 413
    assert "4096" in payload["reason"]
    # A body under the limit still works on the same server.
    status, payload = await _post(client, make_review(model_pod()))
    assert status == 200


async def test_chunked_body_over_limit_is_413(aiohttp_client: Any) -> None:
    client = await ready_client(aiohttp_client, make_app(Config(max_request_bytes=4096)))

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
        for _ in range(10):
            yield b" " * 1024

    resp = await client.post("/mutate", data=chunks(), headers=JSON_HEADERS)
    assert resp.status == 413


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/mutate", 405), ("POST", "/x", 404)]
)
async def test_unknown_routes_are_4xx(
    webhook_client: Any, method: str, path: str, status: int
) -> None:
    resp = await webhook_client.request(method, path)
    assert resp.status == status


# --- the contract of a successful review -------------------------------------------------------


async def test_model_pod_is_mutated_and_the_patch_gives_a_valid_pod(webhook_client: Any) -> None:
    pod = model_pod()
    doc = make_review(pod, uid="0f1e2d3c-aaaa-bbbb-cccc-000000000001")
    status, body = await _post(webhook_client, doc)
    assert status == 200
    assert body["apiVersion"] == "admission.k8s.io/v1"
    assert body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
    assert response["allowed"] is True
    mutated = _patched(pod, response)
    assert mutated["metadata"]["labels"]["modelcache.io/injected"] == "true"
    names = [c["name"] for c in mutated["spec"].get("initContainers", [])]
    assert "modelcache-sidecar" in names
    check_pod(mutated)

    # Re-admitting the mutated pod is a no-op: allowed, and no patchType without a patch.
    status, again = await _post(webhook_client, make_review(mutated, uid="second"))
    assert status == 200
    assert again["response"]["allowed"] is True
    assert "patch" not in again["response"]
    assert "patchType" not in again["response"]


async def test_pod_without_model_is_admitted_with_only_the_reason(webhook_client: Any) -> None:
    pod = model_pod()
    del pod["metadata"]["annotations"]
    pod["spec"]["containers"][0]["args"] = ["--port", "8000"]
    pod["spec"]["containers"][0]["image"] = "nginx"
    status, body = await _post(webhook_client, make_review(pod))
    assert status == 200
    assert body["response"]["allowed"] is True
    patch = json.loads(base64.b64decode(body["response"]["patch"]))
    assert patch == [
        {
            "op": "add",
            "path": "/metadata/annotations",
            "value": {
                "modelcache.io/skipped": "no model: no modelcache.io/model annotation and "
                "none detected in the app containers"
            },
        }
    ]
    assert body["response"]["warnings"][0].startswith("not injected: no model")


async def test_dry_run_gets_the_same_answer(webhook_client: Any) -> None:
    pod = model_pod()
    _, wet = await _post(webhook_client, make_review(pod, uid="u1"))
    _, dry = await _post(webhook_client, make_review(pod, uid="u1", dry_run=True))
    assert dry == wet
    assert "patch" in dry["response"]


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CONNECT"])
async def test_other_operations_are_admitted_unchanged(webhook_client: Any, operation: str) -> None:
    status, body = await _post(
        webhook_client, make_review(model_pod(), operation=operation, uid="op")
    )
    assert status == 200
    assert body["response"] == {"uid": "op", "allowed": True}


@pytest.mark.parametrize(
    ("kind", "obj"),
    [
        ({"group": "apps", "version": "v1", "kind": "Deployment"}, {"kind": "Deployment"}),
        ({"group": "", "version": "v1", "kind": "ConfigMap"}, {"kind": "ConfigMap", "data": {}}),
    ],
)
async def test_non_pods_are_admitted_unchanged(
    webhook_client: Any, kind: dict[str, str], obj: dict[str, Any]
) -> None:
    status, body = await _post(webhook_client, make_review(obj, kind=kind, uid="np"))
    assert status == 200
    assert body["response"] == {"uid": "np", "allowed": True}


async def test_pod_subresource_is_admitted_unchanged(webhook_client: Any) -> None:
    doc = make_review({"kind": "Binding", "target": {"name": "node-1"}}, uid="sub")
    doc["request"]["subResource"] = "binding"
    status, body = await _post(webhook_client, doc)
    assert status == 200
    assert body["response"] == {"uid": "sub", "allowed": True}


async def test_user_error_is_denied_with_a_message_naming_key_and_value(
    webhook_client: Any,
) -> None:
    pod = model_pod()
    pod["metadata"]["annotations"]["modelcache.io/warmup"] = "sometimes"
    status, body = await _post(webhook_client, make_review(pod))
    assert status == 200
    response = body["response"]
    assert response["allowed"] is False
    assert "patch" not in response
    message = response["status"]["message"]
    assert "modelcache.io/warmup" in message
    assert "sometimes" in message
    assert "block" in message  # what is accepted
    assert response["status"]["code"] == 403


async def test_soft_problems_are_warnings(webhook_client: Any) -> None:
    pod = model_pod()
    pod["metadata"]["annotations"]["modelcache.io/affinity"] = "require"
    status, body = await _post(webhook_client, make_review(pod))
    assert status == 200
    response = body["response"]
    assert response["allowed"] is True
    assert any("agentEnabled" in w for w in response["warnings"])


@pytest.mark.parametrize("workers", ["process", "thread"])
async def test_large_pods_are_admitted_off_the_loop(aiohttp_client: Any, workers: str) -> None:
    app = make_app(Config(), offload_bytes=1024, workers=workers)
    client = await ready_client(aiohttp_client, app)
    assert app[STATE].admitter.executor is not None
    for pod in (model_pod(), _large_pod()):
        status, body = await _post(client, make_review(pod))
        assert status == 200
        check_pod(_patched(pod, body["response"]))


def _die_in_worker(pod: dict[str, Any], *, namespace: str | None, config: Config) -> Any:
    from webhook.pipeline import admit_pod

    if (pod.get("metadata") or {}).get("name") == "kill-the-worker":
        os._exit(3)  # what an OOM kill looks like to the pool
    return admit_pod(pod, namespace=namespace, config=config)


async def test_a_dead_worker_process_costs_one_request(aiohttp_client: Any) -> None:
    app = make_app(
        Config(on_error="allow"), offload_bytes=0, admit=_die_in_worker, workers="process"
    )
    client = await ready_client(aiohttp_client, app)
    status, body = await _post(client, make_review(model_pod(name="kill-the-worker"), uid="k"))
    assert status == 200
    assert body["response"]["allowed"] is True
    assert "internal error" in body["response"]["warnings"][0]
    # The pool was replaced: the next pod is mutated normally.
    status, body = await _post(client, make_review(model_pod()))
    assert status == 200
    assert "patch" in body["response"]


# --- internal errors follow onError ----------------------------------------------------------


def _exploding_admit(pod: dict[str, Any], *, namespace: str | None, config: Config) -> Any:
    if (pod.get("metadata") or {}).get("generateName") == "modelcache-warmup-":
        raise RuntimeError("boom during warm-up")
    raise RuntimeError("boom")


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_internal_error_follows_on_error(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture, policy: str
) -> None:
    app = make_app(Config(on_error=policy), admit=_exploding_admit)
    client = await ready_client(aiohttp_client, app)
    with caplog.at_level(logging.INFO):
        status, body = await _post(client, make_review(model_pod(), uid="uid-err-1"))
    assert status == 200
    response = body["response"]
    assert response["uid"] == "uid-err-1"
    assert "patch" not in response
    if policy == "allow":
        assert response["allowed"] is True
        assert any("uid-err-1" in w for w in response["warnings"])
    else:
        assert response["allowed"] is False
        assert "uid-err-1" in response["status"]["message"]
    failed = [r for r in caplog.records if r.getMessage() == "admission failed"]
    assert failed
    assert failed[0].uid == "uid-err-1"  # type: ignore[attr-defined]
    assert failed[0].exc_info is not None
    text = await (await client.get("/metrics")).text()
    assert 'modelcache_webhook_errors_total{stage="admit"} 1.0' in text
    assert 'modelcache_webhook_errors_total{stage="warmup"} 1.0' in text
    assert 'modelcache_webhook_admissions_total{decision="error"} 1.0' in text


def _nan_admit(pod: dict[str, Any], *, namespace: str | None, config: Config) -> Any:
    from webhook.pipeline import admit_pod

    result = admit_pod(pod, namespace=namespace, config=config)
    bad = [{"op": "add", "path": "/metadata/x", "value": float("nan")}]
    return type(result)(**{**result.__dict__, "patch": bad, "allowed": True})


async def test_unencodable_result_follows_on_error(aiohttp_client: Any) -> None:
    client = await ready_client(aiohttp_client, make_app(Config(on_error="deny"), admit=_nan_admit))
    status, body = await _post(client, make_review(model_pod(), uid="nan"))
    assert status == 200
    assert body["response"]["allowed"] is False
    assert "nan" in body["response"]["status"]["message"]


# --- one log line per review, health, metrics --------------------------------------------------


async def test_one_info_line_per_review_with_the_fields(
    webhook_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pod = model_pod()
    pod["metadata"]["annotations"]["secret-ish"] = "do-not-log-me"
    with caplog.at_level(logging.INFO, logger="webhook.admission"):
        await _post(webhook_client, make_review(pod, uid="log-1"))
    lines = [r for r in caplog.records if r.name == "webhook.admission"]
    assert len(lines) == 1
    rec = lines[0]
    assert rec.levelno == logging.INFO
    for key in ("uid", "namespace", "decision", "mutations", "patch_bytes", "duration_ms"):
        assert hasattr(rec, key), key
    assert rec.uid == "log-1"  # type: ignore[attr-defined]
    assert rec.namespace == "ml"  # type: ignore[attr-defined]
    assert rec.patch_bytes > 0  # type: ignore[attr-defined]
    assert rec.mutations  # type: ignore[attr-defined]

    from webhook.logs import JsonFormatter

    line = JsonFormatter().format(rec)
    entry = json.loads(line)
    assert entry["uid"] == "log-1"
    assert entry["msg"] == "admission review"
    assert "do-not-log-me" not in line


async def test_health_and_readiness(webhook_client: Any) -> None:
    assert (await webhook_client.get("/healthz")).status == 200
    resp = await webhook_client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ready"


async def test_not_ready_until_warmed_but_already_serving(aiohttp_client: Any) -> None:
    release = threading.Event()

    def slow_warm_up(pod: dict[str, Any], *, namespace: str | None, config: Config) -> Any:
        from webhook.pipeline import admit_pod

        if (pod.get("metadata") or {}).get("generateName") == "modelcache-warmup-":
            assert release.wait(timeout=60)
        return admit_pod(pod, namespace=namespace, config=config)

    client = await aiohttp_client(make_app(admit=slow_warm_up))
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["status"] == "starting"
        assert (await client.get("/healthz")).status == 200
        status, body = await _post(client, make_review(model_pod()))  # served meanwhile
        assert status == 200
        assert "patch" in body["response"]
    finally:
        release.set()
    await wait_ready(client)


async def test_metrics_count_decisions_and_latency(webhook_client: Any) -> None:
    await _post(webhook_client, make_review(model_pod()))
    await _post(webhook_client, make_review(model_pod(), operation="UPDATE"))
    await webhook_client.post("/mutate", data=b"{", headers=JSON_HEADERS)
    resp = await webhook_client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    decisions = dict(
        re.findall(r'modelcache_webhook_admissions_total\{decision="(\w+)"\} (\S+)', text)
    )
    assert decisions["skipped"] == "1.0"
    assert sum(float(v) for v in decisions.values()) == 2.0
    assert "modelcache_webhook_admission_duration_seconds_count 2.0" in text
    assert 'modelcache_webhook_errors_total{stage="parse"} 1.0' in text


async def test_compressed_body_is_bounded_after_decompression(aiohttp_client: Any) -> None:
    client = await ready_client(aiohttp_client, make_app(Config(max_request_bytes=64 * 1024)))
    bomb = gzip.compress(b" " * (8 * 1024 * 1024))  # 8 KB on the wire, 8 MiB inflated
    headers = {**JSON_HEADERS, "Content-Encoding": "gzip"}
    resp = await client.post("/mutate", data=bomb, headers=headers)
    assert resp.status == 413
    small = gzip.compress(json.dumps(make_review(model_pod(), uid="gz")).encode())
    resp = await client.post("/mutate", data=small, headers=headers)
    assert resp.status == 200
    assert (await resp.json())["response"]["uid"] == "gz"


async def test_the_loop_keeps_serving_while_a_large_pod_is_admitted(aiohttp_client: Any) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_for_large(pod: dict[str, Any], *, namespace: str | None, config: Config) -> Any:
        from webhook.pipeline import admit_pod

        if (pod.get("metadata") or {}).get("managedFields"):
            entered.set()
            assert release.wait(timeout=60)
        return admit_pod(pod, namespace=namespace, config=config)

    app = make_app(Config(), offload_bytes=16 * 1024, admit=slow_for_large)
    client = await ready_client(aiohttp_client, app)
    large = asyncio.create_task(_post(client, make_review(_large_pod(), uid="large")))
    try:
        assert await asyncio.to_thread(entered.wait, 60)
        # The large admission is in progress in a worker; the loop still answers everything.
        assert (await client.get("/healthz")).status == 200
        status, body = await _post(client, make_review(model_pod(), uid="small"))
        assert status == 200
        assert "patch" in body["response"]
        assert not large.done()
    finally:
        release.set()
    status, body = await large
    assert status == 200
    assert body["response"]["uid"] == "large"
