"""``python -m sidecar agent``: the node agent (a DaemonSet, optional).

Data affinity only helps if nodes say what they hold. Every pass the agent

1. scans the node cache (``sidecar.layout``): a model is *ready* when ``manifest.json``
   exists, lists at least one file, and every file it lists is under ``data/`` with the
   listed size and the stamp (inode, size, mtime, ctime) it was verified at (the sha256 was
   checked when the file was written; re-hashing every scan would read the whole cache, so a
   changed stamp only withdraws the label until the next warm-up verifies the file again);
2. evicts least-recently-used models while the cache is over ``--max-bytes`` (size bound)
   or the filesystem holding it has less than ``--min-free`` free (disk pressure: the disk is
   shared with images, logs and emptyDirs, and the kubelet evicts pods when it runs low): a
   model whose ``.model.lock`` cannot be taken exclusively without blocking is in use (a
   mount serving it, a warm-up filling it) and stays, and so does a model a pod pinned
   recently (between its warm-up and its sidecar, or while its sidecar restarts: see "Pins"
   in ``sidecar.layout``; expired pins are removed every pass); for the others the node
   label goes first, then the directory is renamed into ``trash/`` while the exclusive lock
   is still held, so no reader ever sees a half-deleted model, and only then removed;
3. makes the node's ``cache.modelcache.io/<cache-key>`` labels equal the ready set with one
   merge-patch, and none when nothing changed; other labels are never touched. At most
   ``--max-labels`` models (64 by default, the most recently used first) are labelled, so
   the Node object stays small however many models the cache holds (every label is read by
   every scheduler and kubelet watching nodes);
4. starts the pre-warm entries of ``--prewarm-config`` that select this node and are due;
5. counts the warm-ups that ran on the node since the last pass (``sidecar.journal``): cache
   hits, misses, bytes not downloaded thanks to the cache, failures by reason.

The Kubernetes calls are blocking (``kubernetes`` client), so they run in a worker thread;
errors are retried with exponential backoff and full jitter, and a pass that still fails
leaves the loop running (``--once`` then exits non-zero). Metrics are served for Prometheus.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sidecar import journal
from sidecar.cache import NodeCache, file_stamp, read_file_meta
from sidecar.disk import DiskUsage, Size, disk_usage, parse_size
from sidecar.layout import (
    MANIFEST_FILE,
    PIN_TTL,
    ModelDir,
    UnsafePathError,
    models_root,
    trash_root,
)
from sidecar.modelsource import NamedModel
from sidecar.node import watcher
from sidecar.prewarm import PrewarmConfig, PrewarmConfigError, PrewarmEntry, load_prewarm_config
from sidecar.progress import Progress
from sidecar.sources.route import FetchSettings, wrap_source

log = logging.getLogger("sidecar.agent")

#: Node label prefix; the label ``cache.modelcache.io/<cache-key>=ready`` is what the webhook's
#: affinity asks for (``sidecar.modelsource.cache_key``).
LABEL_PREFIX: Final = "cache.modelcache.io/"
LABEL_READY: Final = "ready"
MERGE_PATCH: Final = "application/merge-patch+json"
#: A cache key that can be the name part of a label key; other directories are never labelled.
_LABEL_NAME_RE: Final = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

T = TypeVar("T")
#: ``reason`` label values of the eviction counters.
EVICTION_REASONS: Final = ("size", "disk_pressure")
#: ``via`` label values of ``modelcache_fetch_bytes_total``: where fetched bytes came from.
#: Sources that get bytes elsewhere than the origin (the Dragonfly daemon, peer agents)
#: report them through :meth:`AgentMetrics.count_fetch`; the rest of what the agent's own
#: fetches wrote is counted as ``origin``.
FETCH_VIAS: Final = ("origin", "peer", "dragonfly")
#: ``trigger`` label values: why the agent fetched a model (the pre-warm config, an
#: injected pod bound to the node, an opted-in workload scaling out).
TRIGGERS: Final = ("config", "pod", "scale-out")
#: Buckets of the fetch duration histogram (seconds).
FETCH_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
#: Buckets of the pre-warm lead time (seconds; negative: ready after the pod started).
LEAD_BUCKETS: Final = (-600, -120, -30, -10, 0, 10, 30, 60, 120, 300, 600, 1800, 3600)


class NodeAPIError(RuntimeError):
    """The node could not be read or patched (after retries, or a non-retriable answer)."""


# --- inventory -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelState:
    """One ``models/<key>/`` directory as one scan saw it."""

    key: str
    path: Path
    ready: bool
    bytes: int
    last_used: float
    reason: str = ""  # why not ready

    @property
    def label(self) -> str:
        return LABEL_PREFIX + self.key


def label_for(key: str) -> str:
    return LABEL_PREFIX + key


def _disk_bytes(st: os.stat_result) -> int:
    """Bytes a file costs: partial downloads may be sparse, so count allocated blocks then."""
    allocated = st.st_blocks * 512
    return st.st_size if allocated >= st.st_size else allocated


def tree_bytes(root: Path) -> int:
    """Total bytes of the regular files under ``root``, never following symlinks."""
    total = 0
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += _disk_bytes(entry.stat(follow_symlinks=False))
                    except FileNotFoundError:
                        continue  # removed while we looked: a rename or a finished part
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


def check_ready(mdir: ModelDir) -> str:
    """Return "" when the model is complete, else the reason it is not."""
    try:
        manifest = json.loads(mdir.manifest.read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return "manifest has no file list"
    if manifest.get("key") not in (None, mdir.key):
        return f"manifest is for key {manifest.get('key')!r}"
    if not manifest["files"]:
        return "manifest lists no files"
    for item in manifest["files"]:
        if not isinstance(item, dict) or not isinstance(item.get("size"), int):
            return f"manifest entry {item!r} has no size"
        try:
            path = mdir.data_file(str(item.get("path", "")))
            st = path.stat()
        except UnsafePathError as exc:
            return str(exc)
        except OSError:
            return f"{item.get('path')} is missing"
        if st.st_size != item["size"]:
            return f"{item['path']} has {st.st_size} bytes, manifest says {item['size']}"
        meta = read_file_meta(mdir, str(item["path"]))
        if meta is not None and meta.get("stamp") not in (None, file_stamp(st)):
            # written to since it was verified: not advertised until a warm-up verifies it
            return f"{item['path']} changed on disk since it was verified"
    return ""


def _last_used(mdir: ModelDir) -> float:
    """LRU time: ``.last-used`` mtime, else when it completed, else when it was created."""
    for path in (mdir.last_used, mdir.manifest, mdir.source_file, mdir.root):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


def scan_cache(cache_dir: Path) -> list[ModelState]:
    """Every model directory of the node cache, sorted by key."""
    states = []
    try:
        entries = sorted(
            p for p in models_root(cache_dir).iterdir() if p.is_dir() and not p.is_symlink()
        )
    except FileNotFoundError:
        return []
    for root in entries:
        mdir = ModelDir(cache_dir, root.name)
        reason = check_ready(mdir)
        states.append(
            ModelState(
                key=root.name,
                path=root,
                ready=not reason,
                bytes=tree_bytes(root),
                last_used=_last_used(mdir),
                reason=reason,
            )
        )
    return states


#: Default bound on the node's cache labels (``--max-labels``).
DEFAULT_MAX_LABELS: Final = 64


def labelled_keys(models: Iterable[ModelState], cap: int = DEFAULT_MAX_LABELS) -> list[str]:
    """The keys to label: ready models whose key can be a label, most recently used first,
    at most ``cap`` of them."""
    ready = [m for m in models if m.ready and _LABEL_NAME_RE.match(m.key)]
    ready.sort(key=lambda m: (-m.last_used, m.key))
    return [m.key for m in ready[: max(0, cap)]]


def label_patch(current: Mapping[str, str], ready_keys: Iterable[str]) -> dict[str, str | None]:
    """The merge-patch of ``metadata.labels`` that makes the cache labels equal ``ready_keys``.

    Empty when nothing changes. Labels outside ``cache.modelcache.io/`` are never in it.
    """
    want = {label_for(k) for k in ready_keys if _LABEL_NAME_RE.match(k)}
    patch: dict[str, str | None] = {}
    for label in sorted(want):
        if current.get(label) != LABEL_READY:
            patch[label] = LABEL_READY
    for label in sorted(current):
        if label.startswith(LABEL_PREFIX) and label not in want:
            patch[label] = None
    return patch


def plan_eviction(
    models: Iterable[ModelState],
    max_bytes: int,
    keep_last: Iterable[str] = (),
    need_free: int = 0,
) -> tuple[int, list[ModelState]]:
    """Bytes to free and the candidates in eviction order (least recently used first).

    The bytes are the larger of the excess over ``max_bytes`` (0: no bound) and
    ``need_free``, what the disk lacks to reach its free-space floor. Models in
    ``keep_last`` (pre-warmed for this node) go after every other model, so the agent does
    not evict what it will fetch again at once.
    """
    models = list(models)
    total = sum(m.bytes for m in models)
    over = total - max_bytes if max_bytes > 0 and total > max_bytes else 0
    excess = max(over, need_free, 0)
    if not excess:
        return 0, []
    pinned = set(keep_last)
    order = sorted(models, key=lambda m: (m.key in pinned, m.last_used, m.key))
    return excess, order


def empty_trash(cache_dir: Path) -> None:
    """Remove what a previous pass (or a crash mid-eviction) left in ``trash/``."""
    try:
        leftovers = list(trash_root(cache_dir).iterdir())
    except FileNotFoundError:
        return
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# --- Kubernetes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base*2^n))."""

    attempts: int = 6
    base: float = 0.5
    cap: float = 15.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


def _is_transient(exc: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        return exc.status in (0, 408, 429) or (exc.status or 0) >= 500
    return isinstance(exc, HTTPError | OSError | TimeoutError)


class NodeAPI:
    """The two calls the agent makes, with retries; blocking calls run in a worker thread."""

    def __init__(
        self,
        api_client: Any,
        node: str,
        retry: RetryPolicy | None = None,
        on_error: Callable[[], None] | None = None,
        request_timeout: float = 15.0,
    ) -> None:
        from kubernetes.client import CoreV1Api

        self.api = CoreV1Api(api_client)
        self.node = node
        self.retry = retry or RetryPolicy()
        self._on_error = on_error or (lambda: None)
        self._timeout = request_timeout

    async def _call(self, what: str, fn: Callable[[], T], retry: RetryPolicy | None = None) -> T:
        from kubernetes.client.exceptions import ApiException

        policy = retry or self.retry
        last: BaseException | None = None
        for attempt in range(policy.attempts):
            try:
                return await asyncio.to_thread(fn)
            except Exception as exc:
                self._on_error()
                if not _is_transient(exc):
                    status = exc.status if isinstance(exc, ApiException) else "error"
                    raise NodeAPIError(
                        f"{what} node {self.node!r} failed ({status}): {_brief(exc)}"
                    ) from exc
                last = exc
                if attempt + 1 < policy.attempts:
                    wait = policy.delay(attempt)
                    log.warning(
                        "%s node %s failed (%s), retry %d in %.2fs",
                        what,
                        self.node,
                        _brief(exc),
                        attempt + 1,
                        wait,
                    )
                    await asyncio.sleep(wait)
        raise NodeAPIError(
            f"{what} node {self.node!r} failed {policy.attempts} times: {_brief(last)}"
        ) from last

    async def get_labels(self) -> dict[str, str]:
        node = await self._call(
            "read", lambda: self.api.read_node(self.node, _request_timeout=self._timeout)
        )
        return _labels_of(node)

    async def patch_labels(
        self, patch: Mapping[str, str | None], retry: RetryPolicy | None = None
    ) -> dict[str, str]:
        body = {"metadata": {"labels": dict(patch)}}
        node = await self._call(
            "patch",
            lambda: self.api.patch_node(
                self.node, body, _content_type=MERGE_PATCH, _request_timeout=self._timeout
            ),
            retry,
        )
        return _labels_of(node)


def _labels_of(node: Any) -> dict[str, str]:
    meta = node.metadata
    return dict((meta.labels if meta is not None else None) or {})


def _brief(exc: BaseException | None) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


class NoClusterError(RuntimeError):
    """Neither an in-cluster service account nor a usable kubeconfig: nothing to talk to."""


def load_api_client() -> Any:
    """In-cluster service-account config, falling back to the kubeconfig (``$KUBECONFIG``)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except config.ConfigException as in_cluster:
        try:
            config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError, ValueError, TypeError) as exc:
            where = os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise NoClusterError(
                f"no cluster to talk to: not in a pod ({in_cluster}) and no usable kubeconfig "
                f"at {where} ({exc}); run the agent as the DaemonSet (manifests/agent), or set "
                "KUBECONFIG to a cluster's kubeconfig"
            ) from None
    return client.ApiClient(cfg)


# --- metrics -------------------------------------------------------------------------------


class AgentMetrics:
    """The agent's Prometheus metrics, in their own registry (one per agent)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.cache_bytes = Gauge("modelcache_cache_bytes", "Bytes in the node cache", registry=r)
        self.limit_bytes = Gauge(
            "modelcache_cache_limit_bytes",
            "Cache size bound in bytes, --max-bytes resolved against the disk (0: unbounded)",
            registry=r,
        )
        self.disk_size = Gauge(
            "modelcache_disk_size_bytes",
            "Size of the filesystem holding the node cache",
            registry=r,
        )
        self.disk_free = Gauge(
            "modelcache_disk_free_bytes",
            "Free bytes (for unprivileged writers) on the filesystem holding the node cache",
            registry=r,
        )
        self.min_free = Gauge(
            "modelcache_disk_min_free_bytes",
            "Free-space floor, --min-free resolved: below it the agent evicts (0: none)",
            registry=r,
        )
        self.models = Gauge("modelcache_models", "Models in the node cache", ["state"], registry=r)
        self.evictions = Counter(
            "modelcache_evictions",
            "Models evicted from the node cache, by reason: size (over --max-bytes) or "
            "disk_pressure (free space under --min-free)",
            ["reason"],
            registry=r,
        )
        self.evicted_bytes = Counter(
            "modelcache_evicted_bytes", "Bytes freed by eviction, by reason", ["reason"], registry=r
        )
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason=reason)
            self.evicted_bytes.labels(reason=reason)
        # warm-ups on this node, from the records they leave in the cache (sidecar.journal)
        self.warmups = Counter(
            "modelcache_warmups",
            "Warm-up init containers that ended on this node, by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.warmup_failures = Counter(
            "modelcache_warmup_failures",
            "Models a warm-up could not fetch, by reason (not-found, unauthorized, forbidden, "
            "unreachable, unavailable, timeout, no-files, cache, ...)",
            ["reason"],
            registry=r,
        )
        self.cache_hits = Counter(
            "modelcache_cache_hits",
            "Models a warm-up found complete in the node cache (nothing downloaded)",
            registry=r,
        )
        self.cache_misses = Counter(
            "modelcache_cache_misses",
            "Models a warm-up had to download, in whole or in part",
            registry=r,
        )
        self.saved_bytes = Counter(
            "modelcache_cache_saved_bytes",
            "Bytes warm-ups found in the node cache instead of downloading them",
            registry=r,
        )
        self.fetched_bytes = Counter(
            "modelcache_cache_fetched_bytes",
            "Bytes warm-ups downloaded from model sources into the node cache",
            registry=r,
        )
        for result in ("ok", "failed"):
            self.warmups.labels(result=result)
        self.eviction_skipped = Gauge(
            "modelcache_eviction_skipped_models",
            "Eviction candidates skipped in the last pass because they are in use",
            registry=r,
        )
        self.label_errors = Counter(
            "modelcache_label_patch_errors",
            "Failed node read/patch attempts (each retry counts)",
            registry=r,
        )
        self.label_patches = Counter(
            "modelcache_label_patches", "Node label patches sent", registry=r
        )
        self.prewarm_done = Gauge(
            "modelcache_prewarm_bytes_done",
            "Bytes of a pre-warm entry in the cache (live while it runs)",
            ["model"],
            registry=r,
        )
        self.prewarm_total = Gauge(
            "modelcache_prewarm_size_bytes",
            "Bytes of a pre-warm entry when complete (0 until its source was listed)",
            ["model"],
            registry=r,
        )
        self.prewarm_runs = Counter(
            "modelcache_prewarm_runs", "Pre-warm runs by result", ["result"], registry=r
        )
        self.prewarm_fetched = Counter(
            "modelcache_prewarm_fetched_bytes",
            "Bytes pre-warm runs downloaded from model sources into the node cache",
            registry=r,
        )
        self.last_pass = Gauge(
            "modelcache_agent_last_success_timestamp_seconds",
            "When the last fully successful pass ended",
            registry=r,
        )
        # fleet signals: sum(modelcache_model_ready) by (model) is the number of nodes
        # holding each model
        self.model_ready = Gauge(
            "modelcache_model_ready",
            "1 for each model complete in this node's cache, by cache key; summed across "
            "nodes: the nodes holding the model",
            ["model"],
            registry=r,
        )
        self.fetch_bytes = Counter(
            "modelcache_fetch_bytes",
            "Bytes the agent fetched into the node cache, by where they came from: origin "
            "(the model's source), peer (another node's agent), dragonfly (the node's "
            "Dragonfly daemon)",
            ["via"],
            registry=r,
        )
        for via in FETCH_VIAS:
            self.fetch_bytes.labels(via=via)
        self.fetch_duration = Histogram(
            "modelcache_fetch_duration_seconds",
            "Duration of the agent's fetches of a model set, by trigger (config, pod, "
            "scale-out), successful ones only",
            ["trigger"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.prewarm_starts = Counter(
            "modelcache_prewarm_starts",
            "Pre-warm fetches started, by trigger (config, pod, scale-out)",
            ["trigger"],
            registry=r,
        )
        for trigger in TRIGGERS:
            self.prewarm_starts.labels(trigger=trigger)
        self.prewarm_lead = Histogram(
            "modelcache_prewarm_lead_seconds",
            "For pods the watcher saw bound to the node before they started: how long before "
            "the pod started (status.startTime) its models were complete in the node cache "
            "(negative: after)",
            buckets=LEAD_BUCKETS,
            registry=r,
        )
        self.watch_errors = Counter(
            "modelcache_prewarm_watch_errors",
            "Watch passes that could not read the cluster",
            registry=r,
        )
        self._fetched = 0  # every byte the agent's own fetches wrote
        self._elsewhere = 0  # bytes sources reported as not from the origin
        self._origin_counted = 0

    def count_fetch(self, via: str, n: int) -> None:
        """Bytes a source got from somewhere other than the origin (``peer``, ``dragonfly``).
        ``origin`` reports are ignored: the origin's share is what :meth:`settle_origin`
        finds the others do not account for, so a source that falls back never counts
        twice."""
        if via == "origin" or via not in FETCH_VIAS:
            return
        self.fetch_bytes.labels(via=via).inc(n)
        self._elsewhere += n

    def settle_origin(self, fetched: int) -> None:
        """Add ``fetched`` bytes written by one of the agent's fetches: what the other
        ``via`` counters do not account for came from the origin. (Sources report their
        bytes as they yield them, before the engine writes them, so the origin counter
        never runs ahead.)"""
        self._fetched += fetched
        origin = max(self._origin_counted, self._fetched - self._elsewhere)
        self.fetch_bytes.labels(via="origin").inc(origin - self._origin_counted)
        self._origin_counted = origin

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_warmup(self, record: Mapping[str, Any]) -> None:
        """Add one warm-up record (``sidecar.journal.warmup_record``) to the counters."""
        self.warmups.labels(result="failed" if record.get("result") == "failed" else "ok").inc()
        for m in record.get("models") or []:
            if not isinstance(m, dict):
                continue
            result = m.get("result")
            if result == "hit":
                self.cache_hits.inc()
            elif result == "miss":
                self.cache_misses.inc()
            elif result == "failed":
                self.warmup_failures.labels(reason=str(m.get("reason") or "error")).inc()
            for counter, field_name in (
                (self.saved_bytes, "cached_bytes"),
                (self.fetched_bytes, "fetched_bytes"),
            ):
                value = m.get(field_name)
                if isinstance(value, int) and value > 0:
                    counter.inc(value)


# --- the agent -----------------------------------------------------------------------------


@dataclass
class AgentSettings:
    cache_dir: Path
    node: str
    #: size bound: bytes or a share of the disk (``Size``); 0: unbounded
    max_bytes: int | Size = 0
    #: free-space floor of the disk holding the cache; 0: none
    min_free: int | Size = 0
    prewarm_config: Path | None = None
    #: At most this many cache labels on the node, the most recently used models first.
    max_labels: int = DEFAULT_MAX_LABELS
    interval: float = 30.0
    #: None: no metrics server; 0: any free port (tests).
    metrics_port: int | None = None
    #: None: every interface, IPv4 and IPv6 (the DaemonSet); tests pass "127.0.0.1".
    metrics_host: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: For the label removal made while holding a model's exclusive lock (kept short).
    eviction_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(attempts=3, base=0.2, cap=1.0)
    )
    parallel: int = 8
    prewarm_timeout: float = 1800.0
    pvc_root: str = "/var/run/modelcache/pvc"
    #: Directories the pre-warm config's file:// models may read (none: refused).
    file_roots: tuple[str, ...] = ()
    #: After a failed pre-warm run, wait at least this long (doubling, up to an hour).
    prewarm_backoff: float = 60.0
    #: Seconds a pod's pin keeps its model from eviction after its last renewal.
    pin_ttl: float = PIN_TTL
    #: Event-driven pre-warm (``sidecar.node.watcher``): bound pods and opted-in workloads.
    watch: bool = False
    #: Seconds between two reads of the cluster by the watcher.
    watch_interval: float = 5.0
    #: The node's Dragonfly daemon socket (``--dragonfly-socket``): model bytes go through
    #: it (``sidecar.sources.dragonfly``) where the fetch path wraps sources for the node.
    dragonfly_socket: str | None = None
    #: Peer fetch (``sidecar.node.peers``): ``IP:PORT`` of the peer server (None: off), the
    #: address other nodes dial (when listening on every address), and the directory with
    #: the agents' CA and this agent's certificate (or the CA key to issue one).
    peer_listen: str | None = None
    peer_advertise: str | None = None
    peer_tls_dir: Path | None = None


@dataclass
class _PrewarmState:
    task: asyncio.Task[None] | None = None
    last_start: datetime | None = None
    last_check: datetime | None = None
    failures: int = 0
    not_before: float = 0.0
    progress: Progress | None = None


@dataclass
class PassResult:
    ok: bool
    evicted: list[str] = field(default_factory=list)
    skipped_in_use: list[str] = field(default_factory=list)
    #: why each evicted model went: "size" or "disk_pressure"
    eviction_reasons: dict[str, str] = field(default_factory=dict)
    patched: dict[str, str | None] = field(default_factory=dict)
    started_prewarm: list[str] = field(default_factory=list)
    error: str = ""


WarmFn = Callable[..., Awaitable[Any]]


class Agent:
    """One node's agent. ``run_pass`` is one scan/evict/label/pre-warm round."""

    def __init__(
        self,
        settings: AgentSettings,
        api_client: Any,
        metrics: AgentMetrics | None = None,
        warm: WarmFn | None = None,
        clock: Callable[[], datetime] | None = None,
        *,
        disk: Callable[[Path], DiskUsage] = disk_usage,
        fetch: FetchSettings | None = None,
    ) -> None:
        self.settings = settings
        self._disk = disk
        self.limit = 0  # --max-bytes and --min-free in bytes, resolved every pass
        self.floor = 0
        self.metrics = metrics or AgentMetrics()
        #: how the agent's own fetches read origins (Dragonfly, peers; sidecar.sources.route)
        self.fetch = replace(
            fetch or FetchSettings(),
            dragonfly_socket=settings.dragonfly_socket,
            meter=self.metrics.count_fetch,
        )
        self.api = NodeAPI(
            api_client, settings.node, settings.retry, on_error=self.metrics.label_errors.inc
        )
        self._warm = warm
        self._clock = clock or (lambda: datetime.now(UTC))  # UTC wall clock for schedules
        self.cache = NodeCache(settings.cache_dir)
        self._config = PrewarmConfig()
        self._config_stamp: tuple[float, int] | None = None
        self._prewarm: dict[str, _PrewarmState] = {}
        self._prewarm_keys: set[str] = set()
        self._entries: list[PrewarmEntry] = []
        self._shown_prewarm: set[str] = set()
        self._filling: set[str] = set()
        self._prewarm_failures = 0
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.metrics_url = ""
        self._shown_ready: set[str] = set()
        self._reader = watcher.ClusterReader(api_client) if settings.watch else None
        #: pods the watcher saw bound here before they started: uid -> their models
        self._awaited: dict[str, list[NamedModel]] = {}
        self._measured: set[str] = set()  # pods whose lead time was observed (once each)
        self._watch_task: asyncio.Task[None] | None = None
        #: the last watch pass's scale-out plans (for logs and tests)
        self.last_plans: list[watcher.ScalePlan] = []
        self._resolve_sizes(None)
        if settings.prewarm_config is not None:
            self._config = load_prewarm_config(settings.prewarm_config)  # bad config: fail now
            self._config_stamp = self._stamp(settings.prewarm_config)

    # -- disk ----------------------------------------------------------------------------
    def _resolve_sizes(self, usage: DiskUsage | None) -> None:
        fs = usage.size if usage is not None else 0

        def resolve(v: int | Size) -> int:
            return v.resolve(fs) if isinstance(v, Size) else v

        self.limit = resolve(self.settings.max_bytes)
        self.floor = resolve(self.settings.min_free)
        self.metrics.limit_bytes.set(self.limit)
        self.metrics.min_free.set(self.floor)
        if usage is not None:
            self.metrics.disk_size.set(usage.size)
            self.metrics.disk_free.set(usage.free)

    async def _measure_disk(self) -> DiskUsage | None:
        try:
            usage = await asyncio.to_thread(self._disk, self.settings.cache_dir)
        except OSError as exc:
            log.error("cannot measure the disk of %s: %s", self.settings.cache_dir, exc)
            return None
        self._resolve_sizes(usage)
        return usage

    # -- config --------------------------------------------------------------------------
    @staticmethod
    def _stamp(path: Path) -> tuple[float, int] | None:
        try:
            st = path.stat()  # follows the ConfigMap's ..data symlink swap
        except OSError:
            return None
        return (st.st_mtime, st.st_ino)

    def _reload_config(self) -> None:
        path = self.settings.prewarm_config
        if path is None:
            return
        stamp = self._stamp(path)
        if stamp == self._config_stamp:
            return
        try:
            self._config = load_prewarm_config(path)
            log.info("pre-warm config reloaded: %d entries", len(self._config.models))
        except PrewarmConfigError as exc:
            log.error("%s; keeping the previous config", exc)
        self._config_stamp = stamp

    # -- one pass ------------------------------------------------------------------------
    async def run_pass(self) -> PassResult:
        """Scan, evict, label, schedule pre-warm. Never raises for API errors."""
        self._reload_config()
        result = PassResult(ok=True)
        cache_dir = self.settings.cache_dir
        await asyncio.to_thread(empty_trash, cache_dir)
        for record in await asyncio.to_thread(journal.take_records, cache_dir):
            if record.get("type") == "warmup":
                self.metrics.count_warmup(record)
        models = await asyncio.to_thread(scan_cache, cache_dir)
        await asyncio.to_thread(self._prune_pins, models)
        usage = await self._measure_disk()
        try:
            labels = await self.api.get_labels()
        except NodeAPIError as exc:
            log.error("%s", exc)
            self._observe(models)
            return PassResult(ok=False, error=str(exc))

        entries = self._config.for_node(labels)
        self._entries = entries
        self._prewarm_keys = {m.source.cache_key for e in entries for m in e.models}
        try:
            need_free = max(0, self.floor - usage.free) if usage is not None else 0
            if self.limit > 0 or need_free > 0:
                labels = await self._evict(models, labels, result, need_free)
                models = [m for m in models if m.key not in result.evicted]  # no rescan needed
                if result.evicted:
                    await self._measure_disk()
            patch = label_patch(labels, labelled_keys(models, self.settings.max_labels))
            if patch:
                labels = await self.api.patch_labels(patch)
                self.metrics.label_patches.inc()
                result.patched = patch
                log.info("node %s labels patched: %s", self.settings.node, patch)
        except NodeAPIError as exc:
            log.error("%s", exc)
            result.ok = False
            result.error = str(exc)
        models = [m for m in models if m.key not in result.evicted]

        result.started_prewarm = self._schedule_prewarm(entries, models)
        self._observe(models)
        if result.ok:
            self.metrics.last_pass.set(time.time())
        return result

    def _prune_pins(self, models: list[ModelState]) -> None:
        for m in models:
            self.cache.prune_pins(m.key, self.settings.pin_ttl)

    async def _evict(
        self,
        models: list[ModelState],
        labels: dict[str, str],
        result: PassResult,
        need_free: int = 0,
    ) -> dict[str, str]:
        excess, order = plan_eviction(models, self.limit, self._prewarm_keys, need_free)
        total = sum(m.bytes for m in models)
        over_size = total - self.limit if self.limit > 0 and total > self.limit else 0
        if need_free:
            log.warning(
                "disk pressure: %d bytes free on the disk of %s, floor --min-free is %d: "
                "evicting up to %d bytes",
                self.floor - need_free,
                self.settings.cache_dir,
                self.floor,
                need_free,
            )
        freed = 0
        for model in order:
            if freed >= excess:
                break
            if model.key in self._filling:
                # our own pre-warm fills it (it holds the lock too, but its blocking flock
                # must never wait on a lock this event loop holds)
                result.skipped_in_use.append(model.key)
                continue
            # a mount serving the model or a warm-up filling it holds the lock shared
            with self.cache.hold(model.key, exclusive=True, blocking=False) as idle:
                if not idle:
                    result.skipped_in_use.append(model.key)
                    log.info("not evicting %s: in use by a mount or a warm-up", model.key)
                    continue
                # checked under the lock: a pod between its warm-up and its sidecar, or
                # whose sidecar is restarting, holds no lock but still sees data/
                pins = self.cache.live_pins(model.key, self.settings.pin_ttl)
                if pins:
                    result.skipped_in_use.append(model.key)
                    log.info("not evicting %s: pinned by %s", model.key, ", ".join(pins))
                    continue
                if labels.get(model.label) is not None:
                    # The label goes first: no pod is steered here for a model being removed.
                    # Mounts and warm-ups wait for the lock while we hold it, so the patch
                    # gets a short retry budget; if it fails nothing is deleted this pass.
                    labels = await self.api.patch_labels(
                        {model.label: None}, retry=self.settings.eviction_retry
                    )
                    self.metrics.label_patches.inc()
                if model.key in self._prewarm_keys:
                    log.warning(
                        "evicting pre-warmed model %s: the models pre-warmed on this node do "
                        "not fit in --max-bytes %d / --min-free %d with those in use; it will "
                        "be fetched again",
                        model.key,
                        self.limit,
                        self.floor,
                    )
                trash = trash_root(self.settings.cache_dir)
                trash.mkdir(parents=True, exist_ok=True)
                target = trash / f"{model.key}-{secrets.token_hex(4)}"
                os.rename(model.path, target)
            reason = "size" if freed < over_size else "disk_pressure"
            log.info(
                "evicted %s (%d bytes, last used %s, reason %s)",
                model.key,
                model.bytes,
                datetime.fromtimestamp(model.last_used, UTC).isoformat(),
                reason,
            )
            await asyncio.to_thread(shutil.rmtree, target, True)
            freed += model.bytes
            result.evicted.append(model.key)
            result.eviction_reasons[model.key] = reason
            self.metrics.evictions.labels(reason=reason).inc()
            self.metrics.evicted_bytes.labels(reason=reason).inc(model.bytes)
        self.metrics.eviction_skipped.set(len(result.skipped_in_use))
        if freed < excess:
            log.warning(
                "%d bytes still to free (cache bound %d, disk floor %d): every other model is "
                "in use",
                excess - freed,
                self.limit,
                self.floor,
            )
        return labels

    def _observe(self, models: list[ModelState]) -> None:
        ready = {m.key for m in models if m.ready}
        for key in ready:
            self.metrics.model_ready.labels(model=key).set(1)
        for gone in self._shown_ready - ready:
            self.metrics.model_ready.remove(gone)
        self._shown_ready = ready
        self.metrics.cache_bytes.set(sum(m.bytes for m in models))
        self.metrics.models.labels(state="ready").set(sum(1 for m in models if m.ready))
        self.metrics.models.labels(state="partial").set(sum(1 for m in models if not m.ready))
        by_key = {m.key: m for m in models}
        shown = set()
        for entry in self._entries:
            done, total = self._prewarm_progress(entry, by_key)
            self.metrics.prewarm_done.labels(model=entry.model).set(done)
            self.metrics.prewarm_total.labels(model=entry.model).set(total)
            shown.add(entry.model)
        for gone in self._shown_prewarm - shown:
            self.metrics.prewarm_done.remove(gone)
            self.metrics.prewarm_total.remove(gone)
        self._shown_prewarm = shown

    def _prewarm_progress(
        self, entry: PrewarmEntry, by_key: Mapping[str, ModelState]
    ) -> tuple[int, int]:
        """Bytes done and total of an entry: live from a running warm-up, else from the scan."""
        state = self._prewarm.get(entry.ident)
        progress = state.progress if state is not None else None
        running = state is not None and state.task is not None and not state.task.done()
        if running and progress is not None and progress.total_bytes:
            return progress.done_bytes, progress.total_bytes
        models = [by_key.get(m.source.cache_key) for m in entry.models]
        if all(m is not None and m.ready for m in models):
            total = sum(_manifest_total(m.path) for m in models if m is not None)
            return total, total
        done = sum(m.bytes for m in models if m is not None)
        return done, progress.total_bytes if progress is not None else 0

    # -- pre-warm ------------------------------------------------------------------------
    def _schedule_prewarm(self, entries: list[PrewarmEntry], models: list[ModelState]) -> list[str]:
        now = self._clock()
        ready = {m.key for m in models if m.ready}
        started = []
        for entry in entries:
            state = self._prewarm.setdefault(entry.ident, _PrewarmState())
            previous_check, state.last_check = state.last_check, now
            if state.task is not None and not state.task.done():
                continue
            if time.monotonic() < state.not_before:
                continue
            keys = [m.source.cache_key for m in entry.models]
            cron = entry.cron
            if cron is None:
                due = any(k not in ready for k in keys)
            else:
                due = previous_check is not None and cron.fired_between(previous_check, now)
            if due:
                state.last_start = now
                state.task = asyncio.create_task(self._run_prewarm(entry, state))
                started.append(entry.model)
        return started

    async def _run_prewarm(
        self, entry: PrewarmEntry, state: _PrewarmState, trigger: str = "config"
    ) -> None:
        keys = [m.source.cache_key for m in entry.models]
        self._filling.update(keys)
        log.info("pre-warm %s: starting (%s)", entry.model, trigger)
        self.metrics.prewarm_starts.labels(trigger=trigger).inc()
        state.progress = Progress(emit=lambda line: log.info("pre-warm %s: %s", entry.model, line))
        started = time.monotonic()
        try:
            warm = self._warm or _default_warm
            extra: dict[str, Any] = {}
            if self.settings.dragonfly_socket or self.fetch.peers is not None:
                extra["wrap"] = self.wrap_source  # sidecar.sources.route
            await warm(
                self.cache,
                entry.models,
                include=tuple(entry.include),
                parallel=self.settings.parallel,
                timeout=self.settings.prewarm_timeout,
                pvc_root=self.settings.pvc_root,
                file_roots=self.settings.file_roots,
                progress=state.progress,
                **extra,
            )
        except Exception as exc:  # noqa: BLE001 - any failure of a source must not stop the agent
            state.failures += 1
            self._prewarm_failures += 1
            backoff = min(3600.0, self.settings.prewarm_backoff * 2 ** (state.failures - 1))
            state.not_before = time.monotonic() + backoff
            self.metrics.prewarm_runs.labels(result="failed").inc()
            log.error("pre-warm %s failed: %s (next try in %.0fs)", entry.model, exc, backoff)
        else:
            state.failures = 0
            self.metrics.prewarm_runs.labels(result="ok").inc()
            self.metrics.fetch_duration.labels(trigger=trigger).observe(time.monotonic() - started)
            log.info("pre-warm %s: done", entry.model)
        finally:
            self.metrics.prewarm_fetched.inc(state.progress.fetched_bytes)
            self.metrics.settle_origin(state.progress.fetched_bytes)
            self._filling.difference_update(keys)
            self._wake.set()  # label the new model now, not one interval later

    def prewarm_tasks(self) -> list[asyncio.Task[None]]:
        return [s.task for s in self._prewarm.values() if s.task is not None]

    async def wait_prewarm(self) -> bool:
        """Wait for running pre-warm tasks; True when none of them failed."""
        tasks = [t for t in self.prewarm_tasks() if not t.done()]
        before = self._prewarm_failures
        if tasks:
            await asyncio.gather(*tasks)
        return self._prewarm_failures == before

    def wrap_source(self, origin: Any, uri: str) -> Any:
        """The source the agent's own fetches read ``uri`` through
        (``sidecar.sources.route``): the node's Dragonfly daemon when ``--dragonfly-socket``
        names one, else the other agents when peers are on; the bytes that did not come
        from the origin counted by ``via``."""
        return wrap_source(origin, uri, self.fetch)

    # -- event-driven pre-warm (sidecar.node.watcher) --------------------------------------
    async def watch_pass(self) -> list[str]:
        """Read the cluster once, start the fetches this node should make now (bound pods
        first, then scale-out), observe lead times; the models started. Never raises for
        API errors (logged and counted)."""
        if self._reader is None:
            return []
        try:
            view = await self._reader.read()
        except watcher.ClusterReadError as exc:
            self.metrics.watch_errors.inc()
            log.error("pre-warm watch: %s", exc)
            return []
        wanted, self.last_plans = watcher.decide(view, self.settings.node)
        for plan in self.last_plans:
            if plan.nodes:
                log.info(
                    "pre-warm plan %s: %d wanted, %d warm node(s), %d candidate(s), warming %s",
                    plan.workload,
                    plan.desired,
                    plan.holders,
                    plan.candidates,
                    ", ".join(plan.nodes),
                )
        for pod in watcher.bound_pods(view.pods, self.settings.node):
            uid = str((pod.get("metadata") or {}).get("uid") or "")
            found = watcher.status_models(pod)
            if uid and found is not None and uid not in self._measured:
                self._awaited.setdefault(uid, found[0])
        self._observe_lead(view.pods)
        started = []
        for want in wanted:
            if self._start_wanted(want):
                started.append(want.spec)
        return started

    def _start_wanted(self, want: watcher.Wanted) -> bool:
        if all(self.cache.is_complete(m) for m in want.models):
            return False
        entry = PrewarmEntry(model=want.spec, include=list(want.include))
        state = self._prewarm.setdefault(entry.ident, _PrewarmState())
        if state.task is not None and not state.task.done():
            return False
        if time.monotonic() < state.not_before:
            return False
        log.info("pre-warm %s: %s", want.spec, want.reason)
        state.last_start = self._clock()
        state.task = asyncio.create_task(self._run_prewarm(entry, state, want.trigger))
        return True

    def _observe_lead(self, pods: list[dict[str, Any]]) -> None:
        """Lead time of each awaited pod once it started and its models are complete."""
        by_uid = {str((p.get("metadata") or {}).get("uid") or ""): p for p in pods}
        self._measured &= by_uid.keys()  # forget pods that are gone
        for uid in list(self._awaited):
            pod = by_uid.get(uid)
            if pod is None or (pod.get("spec") or {}).get("nodeName") != self.settings.node:
                del self._awaited[uid]  # gone (or never ours): nothing to measure
                continue
            start = watcher.pod_start(pod)
            models = self._awaited[uid]
            if start is None or not all(self.cache.is_complete(m) for m in models):
                continue
            ready = max(self.cache.model_dir(m).manifest.stat().st_mtime for m in models)
            self.metrics.prewarm_lead.observe(start.timestamp() - ready)
            del self._awaited[uid]
            self._measured.add(uid)

    async def _watch_loop(self) -> None:
        while True:
            try:
                await self.watch_pass()
            except Exception:  # one bad object must not end the watcher for good
                self.metrics.watch_errors.inc()
                log.exception("pre-warm watch pass failed")
            await asyncio.sleep(self.settings.watch_interval)

    # -- loop ----------------------------------------------------------------------------
    async def start_metrics(self) -> None:
        if self.settings.metrics_port is None:
            return
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app.router.add_get("/metrics", metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.metrics_host, self.settings.metrics_port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.metrics_url = f"http://{host}:{port}/metrics"
        log.info("metrics on %s", self.metrics_url)

    async def run(self, once: bool = False) -> int:
        """The agent loop; with ``once``, one pass (and its pre-warm) then an exit status."""
        if once:
            watched = await self.watch_pass()
            result = await self.run_pass()
            if result.started_prewarm or watched:
                warmed = await self.wait_prewarm()
                result = await self.run_pass()
                return 0 if result.ok and warmed else 1
            return 0 if result.ok else 1
        await self.start_metrics()
        if self._reader is not None:
            self._watch_task = asyncio.create_task(self._watch_loop())
        failures = 0
        while True:
            self._wake.clear()
            result = await self.run_pass()
            failures = 0 if result.ok else failures + 1
            # after failed passes come back sooner than the interval, but never in a tight loop
            wait = self.settings.interval
            if failures:
                wait = min(wait, self.settings.retry.delay(failures) + 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        for task in self.prewarm_tasks():
            task.cancel()
        for task in self.prewarm_tasks():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.settings.dragonfly_socket:
            from sidecar.sources import dragonfly

            await dragonfly.daemon_client(self.settings.dragonfly_socket).aclose()


def _manifest_total(root: Path) -> int:
    try:
        data = json.loads((root / MANIFEST_FILE).read_text())
        return int(data.get("total_bytes") or sum(f["size"] for f in data["files"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def warm_can_wrap() -> bool:
    """Whether the fetch engine takes a source wrapper (``warm_models(wrap=...)``): what
    routes the agent's fetches through the Dragonfly daemon."""
    import inspect

    from sidecar.warmup import warm_models

    return "wrap" in inspect.signature(warm_models).parameters


async def _default_warm(cache: NodeCache, models: list[Any], **kwargs: Any) -> Any:
    from sidecar.warmup import warm_models

    if "wrap" in kwargs and not warm_can_wrap():
        raise RuntimeError(
            "--dragonfly-socket: this build's fetch engine cannot route through a daemon "
            "(warm_models has no wrap parameter)"
        )
    return await warm_models(cache, models, **kwargs)


# --- CLI -----------------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    sizes = {}
    for flag, value in (("--max-bytes", args.max_bytes), ("--min-free", args.min_free)):
        try:
            sizes[flag] = parse_size(str(value))
        except ValueError as exc:
            raise ValueError(f"{flag} {exc}") from None
    if args.interval <= 0:
        raise ValueError(f"--interval {args.interval}: must be positive")
    if not 0 <= args.max_labels <= 1000:
        raise ValueError(f"--max-labels {args.max_labels}: must be 0-1000")
    if not 0 <= args.metrics_port <= 65535:
        raise ValueError(f"--metrics-port {args.metrics_port}: must be 0-65535")
    watch_interval = getattr(args, "prewarm_watch_interval", 5.0)
    if watch_interval <= 0:
        raise ValueError(f"--prewarm-watch-interval {watch_interval}: must be positive")
    dragonfly_socket = getattr(args, "dragonfly_socket", None) or None
    if dragonfly_socket is not None and not os.path.isabs(dragonfly_socket):
        raise ValueError(f"--dragonfly-socket {dragonfly_socket}: must be an absolute path")
    peer_listen = getattr(args, "peer_listen", None)
    peer_tls_dir = getattr(args, "peer_tls_dir", None)
    if peer_listen and not peer_tls_dir:
        raise ValueError("--peer-listen needs --peer-tls-dir (the agents' CA and certificate)")
    if peer_listen:
        from sidecar.node.peers import parse_listen

        parse_listen(peer_listen)  # PeerSetupError (a ValueError) naming the flag
    return AgentSettings(
        cache_dir=Path(args.cache_dir),
        node=args.node,
        max_bytes=sizes["--max-bytes"],
        min_free=sizes["--min-free"],
        prewarm_config=Path(args.prewarm_config) if args.prewarm_config else None,
        file_roots=tuple(args.file_root),
        max_labels=args.max_labels,
        interval=args.interval,
        metrics_port=None if args.once or args.metrics_port == 0 else args.metrics_port,
        watch=bool(getattr(args, "prewarm_watch", False)),
        watch_interval=watch_interval,
        dragonfly_socket=dragonfly_socket,
        peer_listen=peer_listen or None,
        peer_advertise=getattr(args, "peer_advertise", None) or None,
        peer_tls_dir=Path(peer_tls_dir) if peer_tls_dir else None,
    )


async def _main(settings: AgentSettings, once: bool) -> int:
    try:
        api_client = load_api_client()
    except NoClusterError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 1
    peers = None
    if settings.peer_tls_dir is not None:
        from sidecar.node.peers import PeerSetupError, PeerTLS, start_peers

        listen = settings.peer_listen
        address = settings.peer_advertise or (
            listen.rpartition(":")[0].strip("[]") if listen else ""
        )
        try:
            tls = PeerTLS.from_dir(
                settings.peer_tls_dir, node=settings.node, ips=[address] if address else []
            )
            peers = await start_peers(
                api_client,
                node=settings.node,
                cache_dir=settings.cache_dir,
                tls=tls,
                listen=listen,
                advertise=settings.peer_advertise,
            )
        except PeerSetupError as exc:
            print(f"agent: {exc}", file=sys.stderr)
            return 2
    fetch = FetchSettings(peers=peers.network) if peers is not None else None
    agent = Agent(settings, api_client, fetch=fetch)
    main = asyncio.create_task(agent.run(once=once))
    loop = asyncio.get_running_loop()
    # SIGTERM (pod deletion) stops between steps; an eviction's rename is atomic and a
    # pre-warm download resumes later, so stopping anywhere is safe
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    try:
        return await main
    except asyncio.CancelledError:
        log.info("stopping on signal")
        return 0
    finally:
        await agent.close()
        if peers is not None:
            await peers.aclose()


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        if settings.prewarm_config is not None:
            load_prewarm_config(settings.prewarm_config)  # a bad config fails before any work
    except (ValueError, PrewarmConfigError) as exc:
        log.error("%s", exc)
        return 2
    try:
        return asyncio.run(_main(settings, args.once))
    except KeyboardInterrupt:
        return 130


__all__ = [
    "LABEL_PREFIX",
    "LABEL_READY",
    "Agent",
    "AgentMetrics",
    "AgentSettings",
    "ModelState",
    "NodeAPI",
    "NodeAPIError",
    "PassResult",
    "RetryPolicy",
    "check_ready",
    "label_patch",
    "labelled_keys",
    "plan_eviction",
    "scan_cache",
]
