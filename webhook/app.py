"""``build_app(config)``: the composition root of the admission server.

Routes, typed application state and the start/stop of background work (admission workers,
pipeline warm-up, certificate watcher) are wired here and nowhere else; ``handlers.py`` only
speaks HTTP, ``review.py`` only the envelope, ``pipeline.py`` only the mutation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from webhook import handlers
from webhook.config import Config
from webhook.events import EventRecorder, default_api_factory, in_cluster
from webhook.listener import Limits, Listener
from webhook.metrics import Metrics
from webhook.pipeline import admit_pod
from webhook.review import Pod
from webhook.state import (
    DEFAULT_OFFLOAD_BYTES,
    DEFAULT_WORKERS,
    STATE,
    AdmitFn,
    Admitter,
    ServerState,
    Workers,
)
from webhook.tls import CertReloader

log = logging.getLogger(__name__)

#: Seconds aiohttp keeps reading (and discarding) a body the handler did not read, before
#: closing, so a client that is still sending sees the answer (413, 408) instead of a reset.
LINGER_SECONDS = 1.0

# A pod the warm-up admits at start so imports, regex compilation and caches are hot before
# /readyz says yes: the first real review then costs what every later one costs.
_WARMUP_POD: Pod = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "modelcache-warmup-",
        "annotations": {"modelcache.io/model": "hf://modelcache/warmup"},
    },
    "spec": {
        "containers": [
            {"name": "app", "image": "vllm/vllm-openai", "args": ["--model", "modelcache/warmup"]}
        ]
    },
}


async def _admission_workers(app: web.Application) -> AsyncIterator[None]:
    """Start the worker pool, and warm the pipeline in the background: the port opens at
    once (liveness answers, early reviews are served, just slower) and /readyz turns ready
    when the warm-up is done."""
    state = app[STATE]
    state.admitter.start()

    async def warm() -> None:
        try:
            await state.admitter.warm(_WARMUP_POD)
        except Exception:
            # Still become ready: every review then follows onError, which is what the
            # cluster gets with the webhook down anyway, and the error is logged and counted.
            state.metrics.errors.labels("warmup").inc()
            log.exception("pipeline warm-up failed")
        state.warmed_event.set()

    task = asyncio.create_task(warm(), name="pipeline-warm-up")
    yield
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    state.admitter.stop()


async def _watch_certs(app: web.Application) -> AsyncIterator[None]:
    reloader = app[STATE].reloader
    if reloader is None:
        yield
        return
    task = asyncio.create_task(reloader.watch(), name="cert-watch")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _record_events(app: web.Application) -> AsyncIterator[None]:
    recorder = app[STATE].events
    if recorder is None:
        yield
        return
    recorder.start()
    yield
    await recorder.stop()


def events_from_config(config: Config, metrics: Metrics) -> EventRecorder | None:
    """The Event recorder ``config.events`` asks for: ``auto`` records when in a cluster."""
    if config.events == "off" or (config.events == "auto" and not in_cluster()):
        return None
    return EventRecorder(default_api_factory, metrics, config.event_queue_size)


def build_app(
    config: Config,
    *,
    reloader: CertReloader | None = None,
    metrics: Metrics | None = None,
    admit: AdmitFn = admit_pod,
    offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
    workers: Workers = DEFAULT_WORKERS,
    events: EventRecorder | None = None,
) -> web.Application:
    """The admission server application.

    ``reloader`` owns the serving TLS context (the caller passes ``reloader.context`` to the
    site) and is polled for cert changes while the app runs. ``admit`` is the pipeline entry
    point; tests substitute a failing one to exercise the onError policy. ``events`` records
    decisions as Kubernetes Events; without it, ``config.events`` decides.
    """
    metrics = metrics or Metrics()
    if reloader is not None and reloader.on_result is None:
        reloader.on_result = lambda result: _count_reload(metrics, result)
    # The body limit is enforced by the /mutate handler itself (413 with a reason); aiohttp's
    # own limit only has to stay out of its way.
    app = web.Application(
        client_max_size=config.max_request_bytes + 1,
        middlewares=[handlers.error_middleware],
    )
    app[STATE] = ServerState(
        config=config,
        metrics=metrics,
        admitter=Admitter(admit, config, offload_bytes=offload_bytes, workers=workers),
        reloader=reloader,
        events=events if events is not None else events_from_config(config, metrics),
    )
    app.cleanup_ctx.extend([_admission_workers, _watch_certs, _record_events])
    app.router.add_post("/mutate", handlers.mutate)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    return app


def _count_reload(metrics: Metrics, result: str) -> None:
    metrics.cert_reloads.labels(result).inc()
    if result != "success":
        metrics.errors.labels("tls_reload").inc()


def limits_of(config: Config) -> Limits:
    return Limits(
        header_timeout=config.header_timeout_seconds,
        idle_timeout=config.idle_timeout_seconds,
        max_connections=config.max_connections,
    )


@contextlib.asynccontextmanager
async def serving(
    app: web.Application,
    sock: socket.socket,
    ssl_context: ssl.SSLContext,
    *,
    shutdown_timeout: float = 5.0,
) -> AsyncIterator[Listener]:
    """Serve ``app`` over TLS on the bound socket ``sock`` until the block exits.

    The listener (``webhook/listener.py``) bounds connections and enforces the handshake,
    header and idle deadlines; the body deadline and the bounds on requests in flight are
    the handler's. On exit it stops accepting, then in-flight requests get
    ``shutdown_timeout`` seconds to finish.
    """
    state = app[STATE]
    config = state.config
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        # aiohttp's own idle close, a backstop behind the listener's (which counts it)
        keepalive_timeout=config.idle_timeout_seconds + 1,
        lingering_time=LINGER_SECONDS,
    )
    await runner.setup()
    assert runner.server is not None
    metrics = state.metrics
    listener = Listener(
        runner.server,
        sock,
        ssl_context,
        limits_of(config),
        on_close=lambda reason: metrics.connections_closed.labels(reason).inc(),
        on_count=metrics.connections.set,
    )
    listener.start()
    try:
        yield listener
    finally:
        await listener.stop()
        await runner.cleanup()
