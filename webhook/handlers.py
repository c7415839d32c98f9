"""HTTP only: ``POST /mutate``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.

This is the one module that knows status codes. Anything a client can send gets a 2xx or a
4xx with a reason; an exception out of the pipeline is an internal error, logged with the
request uid and answered per ``config.on_error`` (a valid AdmissionReview either way).
``dryRun`` requests are admitted like any other: the pipeline has no side effects, so there
is nothing to skip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from webhook.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from webhook.review import (
    Decision,
    ReviewError,
    Verdict,
    build_response,
    parse_review,
    patch_size,
    pod_to_admit,
)
from webhook.state import STATE, ServerState

log = logging.getLogger("webhook.admission")

JSON = "application/json"
_CHUNK = 64 * 1024


class _BodyTooLarge(Exception):
    pass


def _problem(status: int, reason: str) -> web.Response:
    return web.json_response({"status": status, "reason": reason}, status=status)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` (never buffered beyond it)."""
    if request.content_length is not None and request.content_length > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _on_error_verdict(state: ServerState, uid: str) -> Decision:
    if state.config.on_error == "allow":
        return Decision(
            allowed=True,
            warnings=[f"modelcache: internal error, pod admitted unchanged (request {uid})"],
        )
    return Decision(
        allowed=False,
        message=f"modelcache: internal error, pod denied by onError=deny (request {uid})",
    )


async def mutate(request: web.Request) -> web.Response:
    state = request.app[STATE]
    metrics = state.metrics
    started = time.perf_counter()
    if request.content_type != JSON:
        metrics.errors.labels("read").inc()
        return _problem(400, f"content type must be {JSON}, got {request.content_type}")
    limit = state.config.max_request_bytes
    try:
        body = await _read_body(request, limit)
    except _BodyTooLarge:
        metrics.errors.labels("read").inc()
        return _problem(413, f"body larger than the limit of {limit} bytes (maxRequestBytes)")
    except HttpProcessingError as e:
        metrics.errors.labels("read").inc()
        return _problem(400, f"cannot read body: {e.message}")
    try:
        review = parse_review(body)
        pod, skip_reason = pod_to_admit(review.request)
    except ReviewError as e:
        metrics.errors.labels("parse").inc()
        return _problem(400, e.reason)

    req = review.request
    namespace = req.namespace or None
    uid = req.uid[:128]  # for logs only: the response echoes the uid whole
    verdict: Verdict
    mutations: list[str] = []
    if pod is None:
        verdict = Decision(allowed=True)
        decision, reason = "skipped", skip_reason
    else:
        try:
            result = await state.admitter(pod, namespace=namespace, size=len(body))
        except Exception:
            metrics.errors.labels("admit").inc()
            log.exception("admission failed", extra={"uid": uid, "namespace": namespace})
            verdict = _on_error_verdict(state, uid)
            decision, reason = "error", f"internal error, onError={state.config.on_error}"
        else:
            verdict = result
            decision, reason, mutations = result.decision, result.reason, list(result.mutations)

    try:
        document = build_response(review, verdict)
    except (TypeError, ValueError):
        # e.g. a NaN the pipeline copied into the patch: not encodable as JSON.
        metrics.errors.labels("respond").inc()
        log.exception("response encoding failed", extra={"uid": uid, "namespace": namespace})
        document = build_response(review, _on_error_verdict(state, uid))
        decision, reason, mutations = "error", "response not encodable", []

    duration = time.perf_counter() - started
    metrics.admissions.labels(decision).inc()
    metrics.latency.observe(duration)
    log.info(
        "admission review",
        extra={
            "uid": uid,
            "namespace": namespace,
            "operation": req.operation[:32],
            "dry_run": bool(req.dryRun),
            "decision": decision,
            "reason": reason,
            "allowed": document["response"]["allowed"],
            "mutations": mutations,
            "patch_bytes": patch_size(document),
            "warnings": len(document["response"].get("warnings", ())),
            "duration_ms": round(duration * 1000, 3),
        },
    )
    return web.json_response(document)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: certs loaded and the pipeline warmed."""
    if request.app[STATE].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "starting"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Last line of defence: aiohttp's own HTTP errors (404, 405, ...) pass through; anything
    else is a bug, logged with the path and answered as a JSON 500 (no traceback to clients)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        request.app[STATE].metrics.errors.labels("internal").inc()
        log.exception("unhandled error", extra={"path": request.path[:200]})
        body: dict[str, Any] = {"status": 500, "reason": "internal error (logged)"}
        return web.json_response(body, status=500)
