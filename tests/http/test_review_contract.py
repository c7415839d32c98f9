"""The AdmissionReview envelope, pure: parse_review / pod_to_admit / build_response."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from webhook.review import (
    API_VERSION,
    Decision,
    ReviewError,
    build_response,
    parse_review,
    patch_size,
    pod_to_admit,
)


def _review(**request: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "uid": "u-1",
        "operation": "CREATE",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "namespace": "ml",
        "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {}},
    }
    base.update(request)
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": base}


def _parse(doc: Any) -> Any:
    return parse_review(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[1]", "must be a JSON object, got list"),
        (b'{"apiVersion": NaN}', "NaN is not a JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b"{}", "apiVersion: Field required"),
        (json.dumps(_review(uid="")).encode(), "request.uid"),
        (json.dumps(_review(uid=7)).encode(), "request.uid: Input should be a valid string"),
        (json.dumps({"apiVersion": API_VERSION, "kind": "AdmissionReview"}).encode(), "request"),
        (
            json.dumps({**_review(), "apiVersion": "admission.k8s.io/v1beta1"}).encode(),
            "accepted: admission.k8s.io/v1/AdmissionReview",
        ),
        (json.dumps({**_review(), "kind": "Pod"}).encode(), "unsupported apiVersion/kind"),
    ],
)
def test_parse_rejects_with_reason(body: bytes, reason: str) -> None:
    with pytest.raises(ReviewError) as info:
        parse_review(body)
    assert reason in info.value.reason


def test_parse_keeps_the_pod_dict_raw_and_ignores_unknown_envelope_fields() -> None:
    doc = _review(userInfo={"username": "x"}, options={"kind": "CreateOptions"})
    doc["request"]["object"]["spec"]["futureField"] = {"keep": [1, 2]}
    review = _parse(doc)
    pod, reason = pod_to_admit(review.request)
    assert reason == ""
    assert pod == doc["request"]["object"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"operation": "UPDATE"}, "operation UPDATE"),
        ({"operation": "DELETE", "object": None}, "operation DELETE"),
        ({"subResource": "binding"}, "subresource binding"),
        ({"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}}, "not a Pod"),
        ({"kind": {"group": "", "version": "v1", "kind": "Service"}}, "not a Pod"),
        ({"object": {"kind": "Service"}}, "not Pod"),
        ({"kind": None, "object": None}, "no object"),
    ],
)
def test_only_pod_create_is_admitted(change: dict[str, Any], reason: str) -> None:
    pod, why = pod_to_admit(_parse(_review(**change)).request)
    assert pod is None
    assert reason in why


def test_pod_create_without_an_object_is_malformed() -> None:
    with pytest.raises(ReviewError, match=r"request\.object must be a JSON object"):
        pod_to_admit(_parse(_review(object=[1])).request)


def test_allowed_with_patch_is_base64_jsonpatch_and_echoes_uid() -> None:
    review = _parse(_review(uid="abc-123"))
    patch = [{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]
    doc = build_response(review, Decision(allowed=True, patch=patch, warnings=["w1"]))
    assert doc["apiVersion"] == API_VERSION
    assert doc["kind"] == "AdmissionReview"
    response = doc["response"]
    assert response["uid"] == "abc-123"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"])) == patch
    assert response["warnings"] == ["w1"]
    assert "status" not in response
    assert patch_size(doc) == len(base64.b64decode(response["patch"]))


def test_empty_patch_has_no_patch_type() -> None:
    doc = build_response(_parse(_review()), Decision(allowed=True))
    assert doc["response"] == {"uid": "u-1", "allowed": True}
    assert patch_size(doc) == 0


def test_denial_carries_message_and_no_patch() -> None:
    patch = [{"op": "add", "path": "/x", "value": 1}]
    verdict = Decision(allowed=False, message="modelcache.io/warmup: 'x'", patch=patch)
    response = build_response(_parse(_review()), verdict)["response"]
    assert response["allowed"] is False
    assert response["status"] == {"code": 403, "message": "modelcache.io/warmup: 'x'"}
    assert "patch" not in response
    assert "patchType" not in response


def test_nan_in_patch_is_refused_not_emitted() -> None:
    verdict = Decision(allowed=True, patch=[{"op": "add", "path": "/x", "value": float("nan")}])
    with pytest.raises(ValueError):
        build_response(_parse(_review()), verdict)


@pytest.mark.parametrize("size", range(1, 8))
def test_patch_size_is_exact_for_every_padding(size: int) -> None:
    verdict = Decision(allowed=True, patch=[{"op": "add", "path": "/a", "value": "x" * size}])
    doc = build_response(_parse(_review()), verdict)
    assert patch_size(doc) == len(base64.b64decode(doc["response"]["patch"]))
