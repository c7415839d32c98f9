"""Every golden case through the server, as the pod a controller would create.

A workload's template becomes a Pod with ``generateName`` and no name, its namespace only in
the AdmissionReview (as the ReplicaSet/Job controllers create them); a Pod document is sent
as written. The patched pod must equal the injected template of the golden output in its spec,
annotations and labels (the same pipeline serves ``inject`` and ``/mutate``), pass the schema
and API-server checks, and warnings and denials must be the ones ``inject`` printed.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.fixtures.podcheck import assert_pod_ok
from tests.fixtures.webhook_server import make_app, make_review, ready_client
from tests.golden.cases import GoldenCase, load_cases
from webhook.workloads import PodSlot, pod_slots

CASES = load_cases()


def _docs(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _controller_pod(doc: dict[str, Any], slot: PodSlot) -> tuple[dict[str, Any], str]:
    namespace = slot.namespace or "default"
    if doc.get("kind") == "Pod":
        return copy.deepcopy(slot.pod), namespace
    template = copy.deepcopy(slot.pod)
    meta = dict(template.get("metadata") or {})
    meta.pop("name", None)
    meta.pop("namespace", None)
    owner = (doc.get("metadata") or {}).get("name", "workload")
    meta["generateName"] = f"{owner}-5d8f7c9b4-"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template.get("spec")}
    return pod, namespace


def _slot_warnings(case: GoldenCase, owner: str) -> list[str]:
    prefix = f"Warning: {owner}: "
    return [line[len(prefix) :] for line in case.warnings.splitlines() if line.startswith(prefix)]


async def _admit(client: Any, pod: dict[str, Any], namespace: str) -> dict[str, Any]:
    resp = await client.post(
        "/mutate",
        data=json.dumps(make_review(pod, namespace=namespace)),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    response: dict[str, Any] = (await resp.json())["response"]
    return response


def _apply(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "patch" not in response:
        return pod
    patch = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(pod), patch)
    return result


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_golden_case_through_the_server(aiohttp_client: Any, case: GoldenCase) -> None:
    webhook_client = await ready_client(aiohttp_client, make_app(case.config))
    inputs = _docs(case.input)
    expected = _docs(case.expected) if case.denied is None else None
    if expected is not None:
        assert len(expected) == len(inputs)
    checked = 0
    denials: list[str] = []
    for i, doc in enumerate(inputs):
        slots = list(pod_slots(inputs, i))
        wanted = list(pod_slots(expected, i)) if expected is not None else [None] * len(slots)
        assert len(wanted) == len(slots)
        for slot, want in zip(slots, wanted, strict=True):
            pod, namespace = _controller_pod(doc, slot)
            response = await _admit(webhook_client, pod, namespace)
            if not response["allowed"]:
                denials.append(f"{slot.owner}: {response['status']['message']}")
                continue
            assert want is not None, f"{case.name}: admitted, but inject denied it"
            assert response.get("warnings", []) == _slot_warnings(case, slot.owner)
            patched = _apply(pod, response)
            meta, want_meta = patched.get("metadata") or {}, want.pod.get("metadata") or {}
            assert patched.get("spec") == want.pod.get("spec")
            assert (meta.get("annotations") or {}) == (want_meta.get("annotations") or {})
            assert (meta.get("labels") or {}) == (want_meta.get("labels") or {})
            assert meta.get("generateName") == pod["metadata"].get("generateName")
            assert_pod_ok(patched)
            checked += 1
    if case.denied is not None:
        assert denials, f"{case.name}: inject denied it, the server admitted every pod"
        assert f"error: denied: {denials[0]}" in case.denied
    else:
        assert checked > 0 or not any(list(pod_slots(inputs, i)) for i in range(len(inputs)))
