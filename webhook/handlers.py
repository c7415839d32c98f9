"""HTTP only: ``POST /mutate``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.

This is the one module that knows status codes. Anything a client can send gets a 2xx or a
4xx with a reason (408 for a body slower than ``body_timeout_seconds``), a 503 when the
server is at one of its bounds (requests in flight, large bodies waiting for a worker); an
exception out of the pipeline is an internal error, logged with the request uid and answered
per ``config.on_error`` (a valid AdmissionReview either way). A client that hangs up is not an
error: it is counted and logged at INFO, never with a traceback.
``dryRun`` requests are admitted like any other: the pipeline has no side effects, so there
is nothing to skip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from webhook.listener import connection_of
from webhook.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from webhook.review import (
    Decision,
    ReviewError,
    Verdict,
    build_response,
    parse_review,
    patch_size,
    pod_identity,
    pod_to_admit,
)
from webhook.state import STATE, ServerState

log = logging.getLogger("webhook.admission")

JSON = "application/json"
_CHUNK = 64 * 1024


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    """The client closed the connection before the body was in: nothing to answer."""


def _problem(status: int, reason: str) -> web.Response:
    return web.json_response({"status": status, "reason": reason}, status=status)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` (never buffered beyond it)."""
    if request.content_length is not None and request.content_length > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
    except ConnectionError:
        raise _ClientGone from None
    if request.content_length is not None and size < request.content_length:
        raise _ClientGone  # the stream ended early: the peer closed mid-body
    conn = connection_of(request)
    if conn is not None:
        conn.body_read()
    return b"".join(chunks)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


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


async def mutate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    metrics = state.metrics
    config = state.config
    started = time.perf_counter()
    if request.content_type != JSON:
        metrics.errors.labels("read").inc()
        return _problem(400, f"content type must be {JSON}, got {request.content_type}")
    # A body that will go to a worker waits for a worker slot *before* it is read, so at
    # most a few large pods are held in memory at once; waiting is bounded by the body
    # deadline (the API server has given up on the request by then).
    length = request.content_length
    large = length is None or length >= state.admitter.offload_bytes
    if large:
        try:
            async with asyncio.timeout(config.body_timeout_seconds):
                await state.large_slots.acquire()
        except TimeoutError:
            metrics.rejected.labels("large").inc()
            return _problem(503, "busy admitting other large pods; try again")
    try:
        return await _read_and_admit(request, state, started)
    finally:
        if large:
            state.large_slots.release()


async def _read_and_admit(
    request: web.Request, state: ServerState, started: float
) -> web.StreamResponse:
    metrics = state.metrics
    config = state.config
    limit = config.max_request_bytes
    try:
        async with asyncio.timeout(config.body_timeout_seconds):
            body = await _read_body(request, limit)
    except _BodyTooLarge:
        metrics.errors.labels("read").inc()
        response = _problem(413, f"body larger than the limit of {limit} bytes (maxRequestBytes)")
        response.force_close()  # the rest of the body is dropped, then the connection closed
        return response
    except _ClientGone:
        metrics.client_disconnects.inc()
        log.info("client closed the connection before sending the whole body")
        return _problem(400, "client closed the connection mid-body")
    except TimeoutError:
        metrics.connections_closed.labels("body_timeout").inc()
        response = _problem(
            408,
            f"body not received within {config.body_timeout_seconds:g} s (bodyTimeoutSeconds)",
        )
        response.force_close()
        return response
    except HttpProcessingError as e:
        metrics.errors.labels("read").inc()
        return _problem(400, f"cannot read body: {e.message}")
    # Counted once the body is in: requests still arriving are bounded by the connection
    # limit and their deadlines, and must not crowd out the ones ready to be decided.
    if state.in_flight >= config.max_requests_in_flight:
        metrics.rejected.labels("in_flight").inc()
        return _problem(503, "too many admission requests in flight (maxRequestsInFlight)")
    state.in_flight += 1
    try:
        return await _admit(request, state, body, started)
    finally:
        state.in_flight -= 1


async def _admit(
    request: web.Request, state: ServerState, body: bytes, started: float
) -> web.StreamResponse:
    metrics = state.metrics
    try:
        review = parse_review(body)
        pod, skip_reason = pod_to_admit(review.request)
    except ReviewError as e:
        metrics.errors.labels("parse").inc()
        log.info("request refused: %s", e.reason)
        return _problem(400, e.reason)

    req = review.request
    namespace = req.namespace or None
    uid = req.uid[:128]  # for logs only: the response echoes the uid whole
    who = {"uid": uid, "namespace": namespace, **pod_identity(req.object)}
    del who["owner_uid"], who["owner_api_version"]
    verdict: Verdict
    mutations: list[str] = []
    warnings: list[str] = []
    if pod is None:
        verdict = Decision(allowed=True)
        decision, reason = "skipped", skip_reason
    elif _client_gone(request):
        # The client left while the request waited: do not spend a worker on it.
        metrics.client_disconnects.inc()
        log.info("client closed the connection before admission", extra=who)
        return _problem(400, "client closed the connection")
    else:
        try:
            result = await state.admitter(pod, namespace=namespace, size=len(body))
        except Exception:
            metrics.errors.labels("admit").inc()
            log.exception("admission failed", extra=who)
            verdict = _on_error_verdict(state, uid)
            decision, reason = "error", f"internal error, onError={state.config.on_error}"
        else:
            verdict = result
            decision, reason = result.decision, result.reason
            mutations, warnings = list(result.mutations), list(result.warnings)
            if state.events is not None and namespace and not req.dryRun:
                state.events.record(
                    namespace=namespace,
                    identity=pod_identity(req.object),
                    decision=decision,
                    reason=result.message or reason,
                    warnings=warnings,
                )

    try:
        document = build_response(review, verdict)
    except (TypeError, ValueError):
        # e.g. a NaN the pipeline copied into the patch: not encodable as JSON.
        metrics.errors.labels("respond").inc()
        log.exception("response encoding failed", extra=who)
        document = build_response(review, _on_error_verdict(state, uid))
        decision, reason, mutations = "error", "response not encodable", []

    duration = time.perf_counter() - started
    metrics.admissions.labels(decision).inc()
    metrics.latency.observe(duration)
    log.info(
        "admission review",
        extra={
            **who,
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
    conn = connection_of(request)
    if conn is not None:
        conn.request_started(has_body=request.body_exists)
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ConnectionError:
        # The client hung up while we answered: nothing to answer, nothing broken here.
        request.app[STATE].metrics.client_disconnects.inc()
        log.info("client closed the connection", extra={"path": request.path[:200]})
        return _problem(400, "client closed the connection")
    except Exception:
        request.app[STATE].metrics.errors.labels("internal").inc()
        log.exception("unhandled error", extra={"path": request.path[:200]})
        body: dict[str, Any] = {"status": 500, "reason": "internal error (logged)"}
        return web.json_response(body, status=500)
    finally:
        if conn is not None:
            conn.request_finished()
