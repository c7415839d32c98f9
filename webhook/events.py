"""Kubernetes Events for admission decisions, recorded off the admission hot path.

Admission warnings reach whoever created the pod, which for a Deployment is the ReplicaSet
controller, not a person; an Event on the pod's owner (or on the pod when it has none) shows
up in ``kubectl describe`` and ``kubectl get events`` where people look.

Best effort by construction: ``EventRecorder.record`` only puts a small dict on a bounded
queue (a full queue drops the Event and counts it); one background task sends them with the
``kubernetes`` client in a worker thread, each call with a short timeout. No admission ever
waits for, or fails because of, the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from webhook.metrics import Metrics

log = logging.getLogger(__name__)

COMPONENT = "modelcache-webhook"
REPORTING_CONTROLLER = "modelcache.io/webhook"
#: Event reasons by decision (``AdmissionResult.decision``); other decisions make no Event.
REASONS = {
    "injected": ("Normal", "ModelcacheInjected"),
    "skipped": ("Normal", "ModelcacheSkipped"),
    "denied": ("Warning", "ModelcacheDenied"),
}
_MESSAGE_LIMIT = 1024  # what events.k8s.io accepts for a note; core/v1 shows it whole
_API_TIMEOUT = (2.0, 5.0)  # connect, read seconds of one create call
_SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

ApiFactory = Callable[[], Any]


def in_cluster() -> bool:
    """Running in a pod with a service account (what ``events: auto`` looks for)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and _SERVICE_ACCOUNT_TOKEN.exists()


def default_api_factory() -> Any:
    """A ``kubernetes`` ApiClient from the in-cluster service account, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def build_event(
    *,
    namespace: str,
    identity: dict[str, str],
    decision: str,
    reason: str,
    warnings: list[str],
    now: dt.datetime | None = None,
) -> dict[str, Any] | None:
    """The core/v1 Event for one decision, or None when there is nothing to attach it to
    (a pod with neither an owner nor a name) or the decision makes no Event."""
    if decision not in REASONS:
        return None
    kind, name = identity.get("owner_kind", ""), identity.get("owner_name", "")
    involved: dict[str, str]
    if kind and name:
        involved = {"kind": kind, "name": name, "namespace": namespace}
        if identity.get("owner_api_version"):
            involved["apiVersion"] = identity["owner_api_version"]
        if identity.get("owner_uid"):
            involved["uid"] = identity["owner_uid"]
    elif identity.get("pod") and not identity["pod"].endswith("-"):
        involved = {"kind": "Pod", "apiVersion": "v1", "name": identity["pod"]}
        involved["namespace"] = namespace
    else:
        return None
    event_type, event_reason = REASONS[decision]
    message = f"pod {identity.get('pod') or '(unnamed)'}: {decision}"
    if reason:
        message += f": {reason}"
    if warnings:
        message += "; warnings: " + "; ".join(warnings)
    if len(message) > _MESSAGE_LIMIT:
        message = message[: _MESSAGE_LIMIT - 3] + "..."
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{involved['name'][:200]}.", "namespace": namespace},
        "involvedObject": involved,
        "type": event_type,
        "reason": event_reason,
        "message": message,
        "source": {"component": COMPONENT},
        "reportingComponent": REPORTING_CONTROLLER,
        "reportingInstance": socket.gethostname()[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def _describe(error: Exception) -> str:
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    if status is not None:  # an ApiException: its str() is a multi-line dump
        return f"API answered {status} {reason or ''}".rstrip()
    text = str(error).splitlines()[0][:300] if str(error) else ""
    return text or type(error).__name__


class EventRecorder:
    """A bounded queue of Events and the task that sends them."""

    def __init__(self, api_factory: ApiFactory, metrics: Metrics, queue_size: int) -> None:
        self._api_factory = api_factory
        self._metrics = metrics
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self._api: Any = None
        self._failures = 0
        self._task: asyncio.Task[None] | None = None

    def record(
        self,
        *,
        namespace: str | None,
        identity: dict[str, str],
        decision: str,
        reason: str,
        warnings: list[str],
    ) -> None:
        """Queue the Event for a decision; never blocks, never raises."""
        if not namespace:
            return
        event = build_event(
            namespace=namespace,
            identity=identity,
            decision=decision,
            reason=reason,
            warnings=warnings,
        )
        if event is None:
            if decision in REASONS:
                self._metrics.events.labels("skipped").inc()
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self._metrics.events.labels("dropped").inc()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-recorder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._api is not None:
            await asyncio.to_thread(self._api.close)
            self._api = None

    async def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config import ConfigException
        from urllib3.exceptions import HTTPError

        failures = (ApiException, ConfigException, HTTPError, OSError, ValueError)
        while True:
            event = await self.queue.get()
            try:
                await asyncio.to_thread(self._send, event)
            except failures as e:  # best effort: counted and logged, never raised
                self._metrics.events.labels("failed").inc()
                self._failures += 1
                # 1st, 2nd, 4th, 8th ... failure: a missing RBAC rule must not flood the log
                if self._failures & (self._failures - 1):
                    continue
                log.warning(
                    "cannot record event (%d failures so far): %s",
                    self._failures,
                    _describe(e),
                    extra={
                        "namespace": event["metadata"]["namespace"],
                        "event_reason": event["reason"],
                    },
                )
            else:
                self._metrics.events.labels("sent").inc()
            finally:
                self.queue.task_done()

    def _send(self, event: dict[str, Any]) -> None:
        from kubernetes import client

        if self._api is None:
            self._api = self._api_factory()
        client.CoreV1Api(self._api).create_namespaced_event(
            # a plain dict body: the client serialises it as is (no typed round trip)
            event["metadata"]["namespace"],
            event,  # type: ignore[arg-type]
            _request_timeout=_API_TIMEOUT,
        )
