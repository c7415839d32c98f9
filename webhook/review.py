"""The AdmissionReview ``admission.k8s.io/v1`` envelope: parse the request, build the response.

Only the envelope is typed (pydantic); the Pod inside stays the raw dict the API server sent,
because round-tripping it through a typed model drops fields the model does not know.
Everything here is pure, so the contract is tested without a server; HTTP status codes live
in ``handlers.py`` alone. A request this module rejects raises ``ReviewError`` with a reason
that names what was wrong (never the offending value, which may be huge).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
PATCH_TYPE = "JSONPatch"
CREATE = "CREATE"
# HTTP-style code the API server shows with a denial (it is data in the body, not our status).
DENIED_CODE = 403

Pod = dict[str, Any]


class ReviewError(ValueError):
    """The body is not an AdmissionReview this server can answer; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Lenient(BaseModel):
    # The API server adds fields over time (userInfo, options, requestKind, ...): ignore them.
    model_config = ConfigDict(extra="ignore", frozen=True)


class GroupVersionKind(_Lenient):
    group: StrictStr = ""
    version: StrictStr = ""
    kind: StrictStr = ""


class AdmissionRequest(_Lenient):
    uid: StrictStr = Field(min_length=1)
    operation: StrictStr = Field(min_length=1)
    kind: GroupVersionKind | None = None
    subResource: StrictStr | None = None
    namespace: StrictStr | None = None
    name: StrictStr | None = None
    # ``Any`` keeps the very dict json.loads made: no copy, no coercion of the pod.
    object: Any = None
    dryRun: StrictBool | None = None


class AdmissionReview(_Lenient):
    apiVersion: StrictStr
    kind: StrictStr
    request: AdmissionRequest


class Verdict(Protocol):
    """What ``build_response`` needs of an admission result (``pipeline.AdmissionResult``
    has these fields, and so does ``Decision`` below)."""

    @property
    def allowed(self) -> bool: ...
    @property
    def patch(self) -> list[dict[str, Any]]: ...
    @property
    def warnings(self) -> list[str]: ...
    @property
    def message(self) -> str | None: ...


@dataclass(frozen=True)
class Decision:
    """A verdict made here rather than by the pipeline: pass-through or the onError policy."""

    allowed: bool
    message: str | None = None
    warnings: list[str] = field(default_factory=list)
    patch: list[dict[str, Any]] = field(default_factory=list)


def _reject_constant(name: str) -> Any:
    raise ReviewError(f"body is not JSON: {name} is not a JSON number")


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_review(body: bytes) -> AdmissionReview:
    """Decode and validate an AdmissionReview request body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReviewError(f"body is not UTF-8 (byte {e.start})") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except ReviewError:
        raise
    except RecursionError:
        raise ReviewError("body is not JSON: nested too deeply") from None
    except ValueError as e:
        raise ReviewError(f"body is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise ReviewError(f"body must be a JSON object, got {type(document).__name__}")
    if _too_deep(document, MAX_DEPTH):
        raise ReviewError(f"body is nested more than {MAX_DEPTH} levels deep")
    try:
        review = AdmissionReview.model_validate(document)
    except ValidationError as e:
        raise ReviewError(f"not an AdmissionReview: {_describe(e)}") from None
    if review.apiVersion != API_VERSION or review.kind != KIND:
        raise ReviewError(
            f"unsupported apiVersion/kind {review.apiVersion[:64]!r}/{review.kind[:64]!r};"
            f" accepted: {API_VERSION}/{KIND}"
        )
    return review


#: Nesting the parser accepts in a request body. Real pods nest about 20 levels (managedFields
#: ``fieldsV1`` included); deeper bodies are refused here, before the pod is copied, diffed or
#: handed to a worker process (whose pickling recursion fails at about 800).
MAX_DEPTH = 100


def _too_deep(document: Any, limit: int) -> bool:
    """Whether ``document`` nests more than ``limit`` containers (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return False


def _text(value: Any, limit: int = 253) -> str:
    return value[:limit] if isinstance(value, str) else ""


def pod_identity(obj: Any) -> dict[str, str]:
    """Who a review is about, for logs and Events: the pod's name (or generateName) and its
    first owner, as short strings; empty strings when the object does not say."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    owners = meta.get("ownerReferences")
    owner = owners[0] if isinstance(owners, list) and owners else None
    owner = owner if isinstance(owner, dict) else {}
    return {
        "pod": _text(meta.get("name")) or _text(meta.get("generateName")),
        "owner_kind": _text(owner.get("kind"), 63),
        "owner_name": _text(owner.get("name")),
        "owner_uid": _text(owner.get("uid"), 64),
        "owner_api_version": _text(owner.get("apiVersion"), 128),
    }


def pod_to_admit(request: AdmissionRequest) -> tuple[Pod | None, str]:
    """The pod to mutate, or ``None`` and the reason it is admitted unchanged.

    Only CREATE of a core/v1 Pod (not a subresource such as ``pods/binding``) is mutated:
    an UPDATE cannot add containers, and mutating anything else is not our business.
    """
    if request.operation != CREATE:
        return None, f"operation {request.operation[:32]} is not mutated"
    if request.subResource:
        return None, f"subresource {request.subResource[:32]} is not mutated"
    gvk = request.kind
    obj = request.object
    if gvk is not None and (gvk.group, gvk.kind) != ("", "Pod"):
        return None, f"kind {gvk.kind[:32] or '(empty)'} is not a Pod"
    if not isinstance(obj, dict):
        if gvk is None:
            return None, "request has no object and no kind"
        raise ReviewError("request.object must be a JSON object for a Pod CREATE")
    if obj.get("kind", "Pod") != "Pod":
        return None, "object kind is not Pod"
    return obj, ""


def encode_patch(patch: list[dict[str, Any]]) -> str:
    """RFC 6902 patch as the base64 of its compact JSON (``allow_nan=False``: NaN is not
    JSON and the API server would reject the whole response)."""
    raw = json.dumps(patch, separators=(",", ":"), allow_nan=False).encode()
    return base64.b64encode(raw).decode("ascii")


def build_response(review: AdmissionReview, verdict: Verdict) -> dict[str, Any]:
    """The AdmissionReview to send back: same apiVersion/kind, the request uid echoed, a
    base64 JSONPatch only when allowed and non-empty, warnings when any, and a status with
    the message on denial."""
    response: dict[str, Any] = {"uid": review.request.uid, "allowed": verdict.allowed}
    if verdict.allowed and verdict.patch:
        response["patchType"] = PATCH_TYPE
        response["patch"] = encode_patch(verdict.patch)
    if verdict.warnings:
        response["warnings"] = [str(w) for w in verdict.warnings]
    if not verdict.allowed:
        response["status"] = {
            "code": DENIED_CODE,
            "message": verdict.message or "denied by modelcache",
        }
    return {"apiVersion": review.apiVersion, "kind": review.kind, "response": response}


def patch_size(document: dict[str, Any]) -> int:
    """Bytes of the JSON patch carried by a response built by ``build_response``."""
    encoded: str = document["response"].get("patch", "")
    return len(encoded) * 3 // 4 - encoded[-2:].count("=")
