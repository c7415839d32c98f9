"""Typed state of the admission server, shared by ``app.py`` (which builds it) and
``handlers.py`` (which reads it), and the ``Admitter`` that decides where the pipeline runs."""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from webhook.config import Config
from webhook.events import EventRecorder
from webhook.metrics import Metrics
from webhook.pipeline import AdmissionResult
from webhook.review import Pod
from webhook.tls import CertReloader

log = logging.getLogger(__name__)

AdmitFn = Callable[..., AdmissionResult]
Workers = Literal["process", "thread"]

# Where the pipeline runs, decided by measurement (docs/bench-admission.md, 2 shared cores):
#
# - ``admit_pod`` costs ~1.4 ms for a typical model pod but grows with the pod: 52 ms with
#   250 KB of managedFields, 330 ms at 1.2 MB (deep copy + diff of the whole object).
# - Small pods inline: under load, inline served 450-800 model pods/s against 180-230/s when
#   every pod went to a worker thread (GIL hand-offs between the loop and the worker cost more
#   than the 1.4 ms of work), and 230-320/s through a process (pickling both ways). Holding
#   the loop for ~1 ms is harmless.
# - Large pods in a worker *process*: while 250 KB pods were being admitted, /healthz on the
#   same server answered at p50 0.25 ms with a process pool, 18-55 ms with a thread pool (the
#   worker holds the GIL; the loop gets it back only every switch interval) and ~500 ms inline
#   (the loop is simply stuck). Large-pod throughput was within noise between thread and
#   process, so the process pool's only cost is its memory (two spawned interpreters).
DEFAULT_OFFLOAD_BYTES = 64 * 1024
DEFAULT_WORKERS: Workers = "process"
MAX_WORKERS = 2  # the machines this runs on have few cores; more workers only queue
LARGE_SLOTS_PER_WORKER = 2  # one running, one queued: the worker never waits for the loop


def _ignore_interrupts() -> None:
    """Worker-process setup: Ctrl-C reaches the whole process group, but only the server
    decides when workers stop (it shuts the pool down on its way out)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Admitter:
    """Runs the (pure, CPU-bound) pipeline inline or in a worker pool by request size."""

    def __init__(
        self,
        admit: AdmitFn,
        config: Config,
        *,
        offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
        workers: Workers = DEFAULT_WORKERS,
    ) -> None:
        self._admit = admit
        self._config = config
        self.offload_bytes = offload_bytes
        self.workers = workers
        self.executor: Executor | None = None

    def _new_executor(self) -> Executor:
        if self.workers == "process":
            # spawn, not fork: forking a process that already runs threads (asyncio's default
            # executor, the cert watcher) can copy a held lock into the child.
            return ProcessPoolExecutor(
                MAX_WORKERS,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_interrupts,
            )
        return ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="admit")

    def start(self) -> None:
        """Create the worker pool (its workers start on first use or in ``warm``)."""
        if self.executor is None:
            self.executor = self._new_executor()

    async def warm(self, warm_pod: Pod) -> None:
        """Admit ``warm_pod`` in this process (in a thread, the loop keeps serving) and in
        every worker, so imports, compiled patterns and caches are hot before /readyz says
        yes and the first real review costs what every later one costs."""
        await asyncio.to_thread(
            self._admit, copy.deepcopy(warm_pod), namespace="default", config=self._config
        )
        if self.executor is not None:
            await asyncio.gather(
                *(self._offload(copy.deepcopy(warm_pod), "default") for _ in range(MAX_WORKERS))
            )

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    async def _offload(self, pod: Pod, namespace: str | None) -> AdmissionResult:
        assert self.executor is not None
        loop = asyncio.get_running_loop()
        # A partial (not a lambda) so a process pool can pickle the call.
        call = functools.partial(self._admit, pod, namespace=namespace, config=self._config)
        executor = self.executor
        try:
            return await loop.run_in_executor(executor, call)
        except BrokenProcessPool:
            # A worker died (OOM kill, segfault): this request follows onError, later ones
            # get a fresh pool instead of failing forever.
            if self.executor is executor:
                log.error("admission worker pool broke; starting a new one")
                self.executor = self._new_executor()
                executor.shutdown(wait=False, cancel_futures=True)
            raise

    async def __call__(self, pod: Pod, *, namespace: str | None, size: int) -> AdmissionResult:
        if size < self.offload_bytes or self.executor is None:
            return self._admit(pod, namespace=namespace, config=self._config)
        return await self._offload(pod, namespace)


@dataclass
class ServerState:
    """Everything handlers need, stored under one typed app key."""

    config: Config
    metrics: Metrics
    admitter: Admitter
    reloader: CertReloader | None = None
    events: EventRecorder | None = None
    #: Admissions being decided now, bodies complete (``config.max_requests_in_flight``).
    in_flight: int = 0
    #: Slots for requests large enough to go to a worker: a few per worker, so at most that
    #: many large bodies are read and held at once; the rest wait (bounded) or get a 503.
    large_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(LARGE_SLOTS_PER_WORKER * MAX_WORKERS)
    )
    #: Set once the pipeline warm-up has finished (successfully or not).
    warmed_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def warmed(self) -> bool:
        return self.warmed_event.is_set()

    @property
    def ready(self) -> bool:
        """Ready once the pipeline is warm and, when serving TLS, a cert pair is loaded."""
        return self.warmed and (self.reloader is None or self.reloader.context is not None)


STATE = web.AppKey("modelcache_state", ServerState)
