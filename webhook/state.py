"""Typed state of the admission server, shared by ``app.py`` (which builds it) and
``handlers.py`` (which reads it), and the ``Admitter`` that decides where the pipeline runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from webhook.config import Config
from webhook.metrics import Metrics
from webhook.pipeline import AdmissionResult
from webhook.review import Pod
from webhook.tls import CertReloader

AdmitFn = Callable[..., AdmissionResult]

# Requests with bodies at least this large are admitted in a worker thread; smaller ones inline.
# Measured on this 2-core machine (docs/bench-admission.md): admitting a typical model pod
# takes about 1 ms of CPU, less than the cost of a thread hop plus GIL hand-off (which also
# raises p99 under load), so small pods run inline. The pipeline's cost grows with the pod (a
# huge managedFields or hundreds of containers: tens of ms for a multi-MiB body), and a
# handler that holds the loop that long stalls every other connection, including /healthz;
# those go to a thread so the loop keeps serving (the GIL still switches every 5 ms). A
# process pool would buy real parallelism but costs a pickle round trip of the pod per
# request, more than the mutation itself for the common case.
DEFAULT_OFFLOAD_BYTES = 64 * 1024


class Admitter:
    """Runs the (pure, CPU-bound) pipeline inline or in a worker thread by request size."""

    def __init__(
        self,
        admit: AdmitFn,
        config: Config,
        *,
        offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
    ) -> None:
        self._admit = admit
        self._config = config
        self.offload_bytes = offload_bytes
        self.executor: ThreadPoolExecutor | None = None

    async def __call__(self, pod: Pod, *, namespace: str | None, size: int) -> AdmissionResult:
        if size < self.offload_bytes or self.executor is None:
            return self._admit(pod, namespace=namespace, config=self._config)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, lambda: self._admit(pod, namespace=namespace, config=self._config)
        )


@dataclass
class ServerState:
    """Everything handlers need, stored under one typed app key."""

    config: Config
    metrics: Metrics
    admitter: Admitter
    reloader: CertReloader | None = None
    warmed: bool = False

    @property
    def ready(self) -> bool:
        """Ready once the pipeline is warm and, when serving TLS, a cert pair is loaded."""
        return self.warmed and (self.reloader is None or self.reloader.context is not None)


STATE = web.AppKey("modelcache_state", ServerState)
