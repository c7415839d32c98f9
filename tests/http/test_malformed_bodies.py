"""Malformed bodies are refused with a 400 and the reason before any worker sees them: a pod
nested 800 levels deep used to fail inside the hand-off to the worker process
(``RecursionError`` while pickling) and follow the onError policy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fixtures.webhook_server import make_app, make_review, model_pod, ready_client
from webhook.review import MAX_DEPTH
from webhook.state import STATE


def _nested(levels: int) -> dict[str, Any]:
    pod = model_pod()
    node: dict[str, Any] = {}
    pod["metadata"]["annotations"]["example.com/x"] = "y"
    pod["spec"]["containers"][0]["x-nested"] = node
    for _ in range(levels):
        child: dict[str, Any] = {}
        node["a"] = child
        node = child
    return pod


def _sample(app: Any, name: str, **labels: str) -> float:
    value = app[STATE].metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else float(value)


@pytest.mark.parametrize("levels", [800, MAX_DEPTH])
async def test_deep_nesting_is_a_400_before_any_worker(aiohttp_client: Any, levels: int) -> None:
    def must_not_run(pod: Any, **kw: Any) -> Any:
        raise AssertionError("the pipeline was reached")

    # offload_bytes=0: every pod would go to a worker, as the 265 KB pod of the report did
    app = make_app(admit=must_not_run, offload_bytes=0)
    app[STATE].warmed_event.set()  # the failing admit cannot warm up; readiness is not tested
    client = await aiohttp_client(app)
    body = json.dumps(make_review(_nested(levels)))
    resp = await client.post("/mutate", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert f"nested more than {MAX_DEPTH} levels" in (await resp.json())["reason"]
    assert _sample(app, "modelcache_webhook_errors_total", stage="parse") == 1
    assert _sample(app, "modelcache_webhook_errors_total", stage="admit") == 0


async def test_real_pods_nest_well_within_the_limit(aiohttp_client: Any) -> None:
    client = await ready_client(aiohttp_client, make_app())
    pod = _nested(MAX_DEPTH - 20)  # the review envelope and the pod add their own levels
    body = json.dumps(make_review(pod))
    resp = await client.post("/mutate", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert (await resp.json())["response"]["allowed"] is True


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 100_000, "body is not JSON"),
        (b'{"apiVersion": 1e999999}', "not an AdmissionReview"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
    ],
)
async def test_malformed_bodies_get_400_with_the_reason(
    webhook_client: Any, body: bytes, reason: str
) -> None:
    resp = await webhook_client.post(
        "/mutate", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert reason in (await resp.json())["reason"]
