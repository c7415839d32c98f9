"""``python -m sidecar mount``: serve models over a read-only FUSE mount.

Orchestration only; the filesystem itself is ``sidecar.fusefs``. At start, for each model:

1. open its source and list it. The listing proves this pod's credentials can read the
   model before any cached byte is served (the node cache is shared across namespaces), so
   a ``SourceAccessError`` ends the process with a clear message and a non-zero code;
2. take the namespace from ``manifest.json`` when the model is complete in the node cache,
   else from the listing (filtered by ``--include`` the way warm-up plans it);
3. hold the model's shared lock for the whole lifetime (the node agent never evicts a model
   that is being served) and touch ``.last-used`` now and every few minutes (LRU order).

With ``--on-failure continue`` a model whose source cannot be listed (not found, refused,
unreachable, timed out) is left out instead of ending the process: the reason is logged and
published as ``<mountpoint>/.left-out/<NAME>`` (which ``probe`` accepts for that model), the
other models are served, and nothing is written for it in the hub cache, so the app loads
it by itself exactly as without modelcache.

With ``--hub-cache DIR`` every ``hf://`` model is also laid out in the Hugging Face cache
layout under DIR (``sidecar.hubcache``), linking to ``<hub-link-root>/<NAME>/<path>``, before
the mount appears (so before ``probe`` can succeed). ``--gguf-alias NAME:QUANT`` adds
``<QUANT>.gguf`` to a model's directory, a symlink to its GGUF file of that quantization.

Then the FUSE loop runs in a thread while the main thread waits for SIGTERM/SIGINT. Fetches
(files opened before they are complete, and the ``--warmup`` background fill) run on one
asyncio loop in a background thread; FUSE worker threads submit to it and wait.

Shutdown never leaves a dead mount (``Transport endpoint is not connected``) behind: on a
signal, waiting fetches are cancelled first (callers get ``ESHUTDOWN``, not ``EINTR``,
which libc and Python would retry), then the mountpoint is unmounted (lazily when busy).
A previous instance killed with SIGKILL leaves a dead mount; the next start unmounts it
lazily before mounting again.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

from sidecar import fusefs, hubcache, nodeclient
from sidecar.cache import CacheError, NodeCache, pin_holder
from sidecar.layout import ANONYMOUS_MARKER, ModelDir, file_id, models_root, safe_relpath
from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_arg
from sidecar.probe import LEFT_OUT_DIR, find_mount, is_fuse
from sidecar.sources import (
    RemoteFile,
    Source,
    SourceAccessError,
    SourceError,
    SourceUnavailableError,
    open_source,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds between touches of ``.last-used`` (the agent's LRU clock).
TOUCH_INTERVAL = 300.0
#: Seconds to wait for the FUSE loop to end after unmounting.
UNMOUNT_GRACE = 5.0


#: ``--on-failure`` values: end the process, or leave the model out and serve the others.
ON_FAILURE = ("fail", "continue")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


class MountError(Exception):
    """The mount cannot start; the message is one line naming what is wrong."""


class SourceListingError(MountError):
    """A model's source cannot be listed (refused, missing, unreachable): ``--on-failure``
    decides whether that ends the mount or leaves the model out."""


@dataclass
class ServedModel:
    model: NamedModel
    source: Source
    mdir: ModelDir
    files: dict[str, RemoteFile]
    complete: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)


def parse_link_root(value: str, cache_dir: Path) -> Path | None:
    """``none`` → no links (bytes via the daemon); ``cache`` → the sidecar's own view."""
    if value == "none":
        return None
    if value == "cache":
        return models_root(cache_dir.resolve())
    if not value.startswith("/"):
        raise MountError(f"--link-root {value!r}: expected an absolute path, 'cache' or 'none'")
    return Path(value)


def parse_gguf_aliases(values: list[str], names: list[str]) -> dict[str, str]:
    """``--gguf-alias NAME:QUANT`` values → ``{NAME: QUANT}``."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, quant = value.partition(":")
        if not sep or not quant or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", quant):
            raise MountError(f"--gguf-alias {value!r}: expected NAME:QUANT (e.g. base:Q4_K_M)")
        if name not in names:
            raise MountError(f"--gguf-alias {value!r}: no --model named {name!r}")
        if name in out:
            raise MountError(f"--gguf-alias {value!r}: {name} has an alias already")
        out[name] = quant
    return out


def pick_gguf(paths: list[str], quant: str) -> str | None:
    """The GGUF file of ``quant``: its name contains the tag (any case), the first shard
    (``-00001-of-0000N``) of a split file, never a vision projector (``mmproj-*``). A name
    where the tag stands alone comes first (``Q4_K`` must not pick ``Q4_K_M`` when both
    exist), then the shortest path, then the name."""
    tag = quant.lower()

    def exact(path: str) -> bool:
        stem = _SPLIT_RE.sub("", path.rsplit("/", 1)[-1].lower())
        stem = stem.removesuffix(".gguf")
        return re.search(rf"(^|[^a-z0-9]){re.escape(tag)}($|[^a-z0-9_])", stem) is not None

    matches = []
    for path in paths:
        name = path.rsplit("/", 1)[-1].lower()
        if not name.endswith(".gguf") or tag not in name or name.startswith("mmproj"):
            continue  # mmproj-*.gguf: a vision projector, never the model itself
        split = _SPLIT_RE.search(name)
        if split and int(split.group(1)) != 1:
            continue
        matches.append(path)
    if not matches:
        return None
    return min(matches, key=lambda p: (not exact(p), len(p), p))


def recorded_commit(mdir: ModelDir, files: list[str]) -> str | None:
    """The hub commit the complete files of a model were fetched at, when they agree.

    The node cache records, per file, the version it was downloaded as (``.locks/<id>.meta``,
    see ``sidecar.layout``); for hub sources that is the commit.
    """
    seen: set[str] = set()
    for path in files:
        try:
            meta = json.loads((mdir.locks_dir / f"{file_id(path)}.meta").read_bytes())
        except (OSError, ValueError):
            continue
        version = meta.get("version") if isinstance(meta, dict) else None
        if isinstance(version, str) and version:
            seen.add(version)
    return seen.pop() if len(seen) == 1 else None


def choose_commit(
    *,
    listed: str | None,
    recorded: str | None,
    complete: bool,
    known_ref: str | None,
    revision: str,
) -> str | None:
    """The commit a hub model is laid out at, or None when it cannot be known.

    ``listed``: what the revision resolves to at the hub now (None: source unreachable);
    ``recorded``: what the cached files were fetched at (``recorded_commit``); ``complete``:
    the model is served from its manifest; ``known_ref``: the refs file an earlier run of
    this pod wrote. A complete model whose branch moved keeps the commit of its bytes
    (never a newer commit with older bytes); an incomplete one is fetched at the listing's.
    """
    if listed is not None:
        return recorded if complete and recorded is not None else listed
    return recorded or known_ref or (revision if _COMMIT_RE.match(revision) else None)


def unmount(mountpoint: str, lazy: bool = False) -> bool:
    """Unmount a FUSE mount; True when it is gone. Tries fusermount3, then umount (root)."""
    commands = [["fusermount3", "-u", *(["-z"] if lazy else []), "-q", mountpoint]]
    if os.geteuid() == 0:
        commands.append(["umount", *(["-l"] if lazy else []), mountpoint])
    for cmd in commands:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s failed: %s", cmd[0], exc)
            continue
        if done.returncode == 0:
            return True
        log.warning("%s: %s", " ".join(cmd), done.stderr.strip() or f"exit {done.returncode}")
    return not is_fuse(find_mount(mountpoint))


def recover_mountpoint(mountpoint: str) -> None:
    """Make ``mountpoint`` a usable empty directory: lazily unmount a dead FUSE mount there.

    A live FUSE mount is left alone and refused: another instance is serving it.
    """
    entry = find_mount(mountpoint)
    if is_fuse(entry):
        try:
            # statfs and listing always reach the daemon (a stat of the root may be answered
            # from the kernel's attribute cache even after the daemon died)
            os.statvfs(mountpoint)
            os.listdir(mountpoint)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
                raise MountError(f"{mountpoint}: cannot inspect the existing mount: {exc}") from exc
            log.warning("%s: dead FUSE mount left behind (%s); unmounting it", mountpoint, exc)
            if not unmount(mountpoint, lazy=True):
                raise MountError(f"{mountpoint}: cannot unmount the dead FUSE mount") from exc
        else:
            raise MountError(f"{mountpoint}: a live FUSE mount is already there")
    try:
        os.makedirs(mountpoint, exist_ok=True)
    except OSError as exc:
        raise MountError(f"--mountpoint {mountpoint}: cannot create it: {exc}") from exc
    if not os.path.isdir(mountpoint):
        raise MountError(f"--mountpoint {mountpoint}: not a directory")


class LoopThread:
    """One asyncio loop in a daemon thread; FUSE threads submit coroutines to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="fetch-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(_cancel_all(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class Provider:
    """``fusefs.FileProvider`` over the node cache: complete files, fetched on demand.

    Concurrent opens of one file in this process share one fetch; across processes the
    node cache's file locks make the fetch single-flight (with warm-ups in other pods).
    """

    def __init__(
        self,
        cache: NodeCache,
        loop: LoopThread,
        models: dict[str, ServedModel],
        parallel: int,
        timeout: float,
    ) -> None:
        self.cache = cache
        self.loop = loop
        self.models = models
        self.parallel = parallel
        self.timeout = timeout
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], concurrent.futures.Future[Path]] = {}

    def ensure_file(self, model: str, relpath: str) -> Path:
        served = self.models[model]
        data = served.mdir.data_file(relpath)
        if relpath in served.complete:
            return data
        # data/ holds complete, verified files only (they appear there by atomic rename); one
        # changed on disk since then is verified (or fetched) again by ensure_file below
        if self.cache.is_file_current(served.model, served.source, served.files[relpath]):
            served.complete.add(relpath)
            return data
        if self.stopping.is_set():
            raise OSError(errno.ESHUTDOWN, "the mount is shutting down")
        key = (model, relpath)
        with self._lock:
            fut = self._inflight.get(key)
            if fut is None:
                log.info("fetching %s/%s on demand", model, relpath)
                fut = self.loop.submit(
                    self.cache.ensure_file(
                        served.model, served.source, served.files[relpath], parallel=self.parallel
                    )
                )
                self._inflight[key] = fut
                fut.add_done_callback(functools.partial(self._forget, key))
        deadline = time.monotonic() + self.timeout
        while True:
            if self.stopping.is_set():
                raise OSError(errno.ESHUTDOWN, "the mount is shutting down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError(errno.ETIMEDOUT, f"fetching {model}/{relpath} timed out")
            try:
                path = fut.result(timeout=min(0.5, remaining))
                break
            except concurrent.futures.TimeoutError:
                continue
            except concurrent.futures.CancelledError as exc:
                raise OSError(errno.ESHUTDOWN, "fetch cancelled") from exc
            except SourceAccessError as exc:
                log.error("fetching %s/%s: access denied: %s", model, relpath, exc)
                raise OSError(errno.EACCES, str(exc)) from exc
            except (SourceError, CacheError, OSError) as exc:
                log.error("fetching %s/%s failed: %s", model, relpath, exc)
                raise OSError(errno.EIO, str(exc)) from exc
        served.complete.add(relpath)
        return Path(path)

    def _forget(self, key: tuple[str, str], _fut: object = None) -> None:
        with self._lock:
            self._inflight.pop(key, None)


def _include_globs(value: str) -> list[str]:
    return [g.strip() for g in value.split(",") if g.strip()]


def _manifest_files(manifest: dict[str, Any]) -> list[RemoteFile]:
    return [
        RemoteFile(safe_relpath(f["path"]), int(f["size"]), f.get("sha256"))
        for f in manifest.get("files", [])
    ]


async def _list_with_retries(cache: NodeCache, source: Source) -> list[RemoteFile]:
    """List the source, retrying transient failures with the cache's backoff policy."""
    attempt = 0
    while True:
        try:
            return await source.list_files()
        except SourceUnavailableError as exc:
            attempt += 1
            if attempt > cache.retries:
                raise
            delay = cache.backoff * 2 ** (attempt - 1)
            log.warning(
                "listing failed (%s); retry %d/%d in %.1fs", exc, attempt, cache.retries, delay
            )
            await asyncio.sleep(delay)


async def _prepare_model(
    cache: NodeCache,
    model: NamedModel,
    source: Source,
    include: list[str],
    *,
    serve_cached: bool = False,
) -> dict[str, RemoteFile]:
    """The file list to serve; raises MountError when the pod may not read the source."""
    complete = cache.is_complete(model)
    try:
        listing = await _list_with_retries(cache, source)
    except SourceAccessError as exc:
        raise SourceListingError(
            f"model {model.name} ({model.source.uri}): access denied: {exc}"
        ) from exc
    except SourceUnavailableError as exc:
        # A complete cache may be served while the source is down, unless requests carry
        # credentials: then the listing is the only proof this pod may read the model.
        anonymous_copy = (
            not getattr(source, "uses_credentials", True)
            and (cache.model_dir(model).root / ANONYMOUS_MARKER).is_file()
        )
        if not complete or not (serve_cached or anonymous_copy):
            raise SourceListingError(
                f"model {model.name} ({model.source.uri}): source unavailable: {exc}"
            ) from exc
        log.warning(
            "model %s: source unavailable (%s); serving the complete cache", model.name, exc
        )
        listing = None
    except SourceError as exc:
        raise SourceListingError(f"model {model.name} ({model.source.uri}): {exc}") from exc
    manifest = cache.read_manifest(model) if complete else None
    files = listing or []
    if manifest is not None:
        try:
            files = _manifest_files(manifest)
        except (KeyError, TypeError, ValueError) as exc:
            if listing is None:
                raise MountError(f"model {model.name}: unreadable manifest.json: {exc}") from exc
            log.warning(
                "model %s: unreadable manifest.json (%s); using the listing", model.name, exc
            )
    if not include:
        return {f.path: f for f in files}
    from sidecar.warmup import plan_files

    planned = plan_files(files, include)
    return {f.path: f for f in planned}


class ModelOrigin(Protocol):
    """Where a mount's file lists and complete files come from.

    :class:`CacheOrigin`: the node cache itself (``--cache-dir``, the legacy privileged
    sidecar that lists sources and fetches). :class:`NodeOrigin`: the CSI node plugin,
    through its socket (``--node-socket``, unprivileged). :class:`MountService` does the
    rest the same way for both: namespace, GGUF aliases, hub cache, serving, signals.
    It is also the ``fusefs.FileProvider`` of the mount (``ensure_file``).
    """

    #: what ``fusefs.serve`` mounts on: a directory, or ``/dev/fd/N`` (mounted already)
    fuse_target: str

    def list_model(self, model: NamedModel, include: list[str]) -> dict[str, int]:
        """``{path: size}`` to serve; :class:`SourceListingError` when it cannot be had."""
        ...

    def hub_commit(self, model: NamedModel, files: list[str], known_ref: str | None) -> str | None:
        """The hub commit to lay the model out at, or None when it cannot be known."""
        ...

    def ensure_file(self, model: str, relpath: str) -> Path: ...

    def link_target(self, entry: fusefs.FileEntry) -> str | None:
        """Where the entry links to, or None to serve it as a regular file."""
        ...

    def describe(self) -> str: ...

    def start(self) -> None:
        """The view serves: start background work."""
        ...

    def stop(self) -> None:
        """Shutting down: every wait ends (``ESHUTDOWN``)."""
        ...

    def close(self) -> None: ...


class CacheOrigin:
    """The ``--cache-dir`` mode: list each source with the pod's credentials, serve from the
    node cache, fetch on demand (and in the background with ``--warmup``)."""

    def __init__(self, args: argparse.Namespace, mountpoint: str) -> None:
        self.args = args
        self.fuse_target = mountpoint
        self.cache_dir = Path(args.cache_dir).absolute()
        self.pvc_root = os.path.abspath(args.pvc_root)
        if args.parallel < 1:
            raise MountError(f"--parallel {args.parallel}: must be at least 1")
        self.link_root = parse_link_root(args.link_root, self.cache_dir)
        self.cache = NodeCache(self.cache_dir)
        self.loop = LoopThread()
        self.served: dict[str, ServedModel] = {}
        self.stack = contextlib.ExitStack()
        self.warmup: concurrent.futures.Future[Any] | None = None
        self.provider = Provider(self.cache, self.loop, self.served, args.parallel, args.timeout)
        self._touch_stop = threading.Event()

    def list_model(self, model: NamedModel, include: list[str]) -> dict[str, int]:
        try:
            source = open_source(
                model,
                pvc_root=self.pvc_root,
                file_roots=self.args.file_root,
                private_dirs=[self.cache_dir],
            )
        except SourceError as exc:
            raise SourceListingError(f"model {model.name}: {exc}") from exc
        with contextlib.ExitStack() as held:
            held.enter_context(self.cache.hold(model))
            try:
                files = self.loop.call(
                    _prepare_model(
                        self.cache,
                        model,
                        source,
                        include,
                        serve_cached=self.args.serve_cached_when_unreachable,
                    )
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    self.loop.call(source.aclose(), timeout=10)
                raise
            # after the access check; the pin outlives a restart of this container
            self.cache.pin(model, pin_holder())
            self.stack.enter_context(held.pop_all())
        mdir = ModelDir(self.cache_dir, model.source.cache_key)
        self.served[model.name] = ServedModel(model, source, mdir, files)
        self.cache.touch(model)
        return {f.path: f.size for f in files.values()}

    def hub_commit(self, model: NamedModel, files: list[str], known_ref: str | None) -> str | None:
        served = self.served[model.name]
        revision = model.source.revision or "main"
        commit = getattr(served.source, "commit", None)
        listed = commit if isinstance(commit, str) and commit else None
        chosen = choose_commit(
            listed=listed,
            recorded=recorded_commit(served.mdir, files),
            complete=self.cache.is_complete(model),
            known_ref=known_ref,
            revision=revision,
        )
        if chosen is not None and listed is not None and chosen != listed:
            log.warning(
                "model %s: the node cache holds commit %s, %s is now %s at the hub: laying "
                "out %s (the app downloads the newer commit by itself)",
                model.name,
                chosen,
                revision,
                listed,
                chosen,
            )
        return chosen

    def ensure_file(self, model: str, relpath: str) -> Path:
        return self.provider.ensure_file(model, relpath)

    def link_target(self, entry: fusefs.FileEntry) -> str | None:
        if self.link_root is None:
            return None
        key = self.served[entry.model].model.source.cache_key
        if self.args.link_root == "cache":
            return str(self.link_root / key / "data" / entry.relpath)
        return str(self.link_root / key / entry.relpath)

    def describe(self) -> str:
        return f"links to {self.link_root}" if self.link_root else "bytes via FUSE"

    def _touch_loop(self) -> None:
        while not self._touch_stop.wait(TOUCH_INTERVAL):
            for served in self.served.values():
                try:
                    self.cache.touch(served.model)
                    self.cache.pin(served.model, pin_holder())
                except (OSError, CacheError) as exc:
                    log.warning("model %s: cannot touch .last-used: %s", served.model.name, exc)

    def start(self) -> None:
        threading.Thread(target=self._touch_loop, name="touch", daemon=True).start()
        if self.args.warmup:
            self._start_warmup()

    def _start_warmup(self) -> None:
        from sidecar.warmup import WarmupError, warm_models

        async def _warm() -> Any:
            return await warm_models(
                self.cache,
                [s.model for s in self.served.values()],
                include=_include_globs(self.args.include),
                parallel=self.args.parallel,
                timeout=self.args.timeout,
                pvc_root=self.pvc_root,
                file_roots=self.args.file_root,
            )

        def _done(fut: concurrent.futures.Future[Any]) -> None:
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is None:
                log.info("background warm-up complete")
            elif isinstance(exc, (WarmupError, SourceError, CacheError)):
                log.error("background warm-up failed: %s", exc)
            else:
                log.error("background warm-up crashed: %r", exc)

        self.warmup = self.loop.submit(_warm())
        self.warmup.add_done_callback(_done)

    def stop(self) -> None:
        self.provider.stopping.set()
        if self.warmup is not None:
            self.warmup.cancel()

    def close(self) -> None:
        self._touch_stop.set()
        for served in self.served.values():
            with contextlib.suppress(Exception):
                self.loop.call(served.source.aclose(), timeout=10)
        self.loop.stop()
        self.stack.close()


class NodeOrigin:
    """The ``--node-socket`` mode: the CSI node plugin mounted ``/dev/fuse`` for this pod,
    fetches into the node cache, and publishes each model's complete files in the pod's
    view volume at ``--link-root/<cache key>/``. This process receives the FUSE connection
    and the status through the socket and never touches the node cache.

    A file complete when the mount starts is a symlink into the view (data never crosses
    this daemon); one that is not is a regular file whose ``open`` waits until the status
    says it is complete (polled about every half second), then reads through the view's
    file. An entry's type never changes while mounted (the kernel caches attributes).
    """

    def __init__(self, args: argparse.Namespace, models: list[NamedModel]) -> None:
        self.socket_path = args.node_socket
        self.timeout = float(args.timeout)
        if not str(args.link_root).startswith("/"):
            raise MountError(
                f"--link-root {args.link_root!r}: with --node-socket, the absolute path where "
                "the csi view volume is mounted (its files are what the mount serves)"
            )
        self.link_root = Path(args.link_root)
        self.models = models
        self.linked: dict[str, set[str]] = {}
        self.keys: dict[str, str] = {}
        self.fuse_fd = -1
        self.fuse_target = ""
        self.tracker: nodeclient.StatusTracker | None = None

    def connect(self) -> None:
        """Receive the FUSE descriptor and the first status (waiting up to ``--timeout``)."""
        deadline = time.monotonic() + self.timeout
        try:
            fd, status = nodeclient.wait_reachable(
                self.socket_path, deadline, on_wait=log.info, keep_fd=True
            )
        except nodeclient.NodeStatusError as exc:
            raise MountError(f"no FUSE connection from the node plugin: {exc}") from None
        problems = nodeclient.mismatches(status, [(m.name, m.source.uri) for m in self.models])
        if problems:
            os.close(fd)
            raise MountError("; ".join(problems))
        self.fuse_fd = fd
        self.fuse_target = f"/dev/fd/{fd}"
        self.tracker = nodeclient.StatusTracker(self.socket_path, status)
        log.info(
            "received the FUSE connection of volume %s from %s", status.volume_id, self.socket_path
        )

    def list_model(self, model: NamedModel, include: list[str]) -> dict[str, int]:
        assert self.tracker is not None
        try:
            status = self.tracker.wait_model_listed(model.name, self.timeout)
        except nodeclient.NodeStatusError as exc:
            raise SourceListingError(str(exc)) from None
        if status.failed:
            raise SourceListingError(
                f"model {model.name} ({model.source.uri}): the node plugin could not fetch "
                f"it: {status.error or 'no reason given'}"
            )
        files = [RemoteFile(safe_relpath(f.path), f.size) for f in status.files]
        if include:
            from sidecar.warmup import plan_files

            files = plan_files(files, include)
        chosen = {f.path for f in files}
        self.linked[model.name] = {f.path for f in status.files if f.complete} & chosen
        self.keys[model.name] = status.cache_key
        return {f.path: f.size for f in files}

    def hub_commit(self, model: NamedModel, files: list[str], known_ref: str | None) -> str | None:
        assert self.tracker is not None
        status = self.tracker.status.model(model.name)
        listed = status.commit if status is not None else None
        return choose_commit(
            listed=listed or None,
            recorded=None,
            complete=False,
            known_ref=known_ref,
            revision=model.source.revision or "main",
        )

    def _view_file(self, model: str, relpath: str) -> Path:
        return self.link_root / self.keys[model] / relpath

    def ensure_file(self, model: str, relpath: str) -> Path:
        if relpath not in self.linked.get(model, ()):
            assert self.tracker is not None
            self.tracker.wait_file(model, relpath, self.timeout)
        return self._view_file(model, relpath)

    def link_target(self, entry: fusefs.FileEntry) -> str | None:
        if entry.relpath in self.linked.get(entry.model, ()):
            return str(self._view_file(entry.model, entry.relpath))
        return None

    def describe(self) -> str:
        linked = sum(len(v) for v in self.linked.values())
        return f"{linked} complete file(s) as links to {self.link_root}, the others on open"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.stopping.set()

    def close(self) -> None:
        pass  # the descriptor lives as long as the FUSE loop that reads it: until exit


class MountService:
    """Everything one ``mount`` process holds; ``run`` drives it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # absolute: libfuse changes the working directory to / when it starts serving
        self.mountpoint = os.path.abspath(args.mountpoint)
        self.include = _include_globs(args.include)
        try:
            self.models = [parse_model_arg(v) for v in args.model]
        except ModelSourceError as exc:
            raise MountError(str(exc)) from exc
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise MountError(f"--model: duplicate model names in {', '.join(names)}")
        self.on_failure = getattr(args, "on_failure", "fail")
        if self.on_failure not in ON_FAILURE:
            raise MountError(f"--on-failure {self.on_failure!r}: expected fail or continue")
        hub_cache = getattr(args, "hub_cache", None)
        self.hub_cache = Path(hub_cache).absolute() if hub_cache else None
        self.hub_link_root = getattr(args, "hub_link_root", None) or self.mountpoint
        if not self.hub_link_root.startswith("/"):
            raise MountError(f"--hub-link-root {self.hub_link_root!r}: expected an absolute path")
        self.gguf_aliases = parse_gguf_aliases(list(getattr(args, "gguf_alias", None) or []), names)
        self.node_mode = getattr(args, "node_socket", None) is not None
        self.origin: ModelOrigin = (
            NodeOrigin(args, self.models) if self.node_mode else CacheOrigin(args, self.mountpoint)
        )
        self.served: dict[str, dict[str, int]] = {}
        self.aliases: dict[str, dict[str, str]] = {}
        self.left_out: dict[str, str] = {}
        self.stop_requested = False
        self.fuse_error: BaseException | None = None
        self.exit_at_once = False
        self.ready = threading.Event()

    # -- start ------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.hub_cache is not None and not self.hub_cache.is_dir():
            raise MountError(f"--hub-cache {self.hub_cache}: not a directory")
        if isinstance(self.origin, NodeOrigin):
            self.origin.connect()
        for model in self.models:
            try:
                self.served[model.name] = self.origin.list_model(model, self.include)
            except SourceListingError as exc:
                if self.on_failure != "continue":
                    raise
                self.left_out[model.name] = str(exc)
                log.warning(
                    "model %s left out (--on-failure continue): %s; the app loads it by itself",
                    model.name,
                    exc,
                )
                continue
            log.info(
                "model %s: %d files from %s",
                model.name,
                len(self.served[model.name]),
                model.source.uri,
            )
        for name, quant in self.gguf_aliases.items():
            if name in self.served:
                self._alias_gguf(name, quant)
        seen: set[tuple[str, str]] = set()
        for model in self.models:
            if self.hub_cache is None or not model.source.is_hub:
                continue
            if model.name not in self.served or not self._lay_out_hub(model, seen):
                # no layout, but the app's mount of the folder must be writable for it
                try:
                    hubcache.ensure_repo_dir(self.hub_cache, model.source.location)
                except (hubcache.HubCacheError, OSError) as exc:
                    raise MountError(f"model {model.name}: hub cache: {exc}") from exc

    def _alias_gguf(self, name: str, quant: str) -> None:
        target = pick_gguf(sorted(self.served[name]), quant)
        if target is None:
            raise MountError(
                f"--gguf-alias {name}:{quant}: model {name} has no GGUF file of {quant}"
            )
        self.aliases[name] = {f"{quant}.gguf": target}
        log.info("model %s: %s.gguf -> %s", name, quant, target)

    def _lay_out_hub(self, model: NamedModel, seen: set[tuple[str, str]]) -> bool:
        """Write the model's layout; False when it gets none (its commit is unknown)."""
        assert self.hub_cache is not None
        src, name = model.source, model.name
        files = sorted(self.served[name])
        revision = src.revision or "main"
        known_ref = hubcache.read_ref(self.hub_cache, src.location, revision)
        commit = self.origin.hub_commit(model, files, known_ref)
        if commit is None:
            log.warning(
                "model %s: the hub commit of %s is unknown (source unreachable, nothing "
                "recorded); no hub-cache layout, the app resolves it by itself",
                name,
                src.uri,
            )
            return False
        if (src.location, commit) in seen:
            log.info("model %s: %s@%s is laid out already", name, src.location, commit)
            return True
        seen.add((src.location, commit))
        try:
            plan = hubcache.plan_repo(
                src.location, revision, commit, files, f"{self.hub_link_root.rstrip('/')}/{name}"
            )
            done = hubcache.write_repo(self.hub_cache, plan)
        except (hubcache.HubCacheError, OSError) as exc:
            raise MountError(f"model {name}: cannot write the hub cache layout: {exc}") from exc
        log.info(
            "model %s: hub cache %s/%s at commit %s (%d links, %d new, %d stale removed)",
            name,
            self.hub_cache,
            plan.folder,
            commit,
            len(plan.links),
            done.links,
            done.pruned,
        )
        return True

    # -- serve ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_requested = True

    def serve(self) -> int:
        try:
            namespace = fusefs.Namespace(
                {n: files.items() for n, files in self.served.items()},
                notes={
                    f"{LEFT_OUT_DIR}/{n}": f"{why}\n".encode() for n, why in self.left_out.items()
                },
                aliases=self.aliases,
            )
        except ValueError as exc:
            raise MountError(f"cannot build the file tree: {exc}") from exc

        def _fuse() -> None:
            try:
                fusefs.serve(
                    namespace,
                    self.origin,
                    self.origin.fuse_target,
                    self.origin.link_target,
                    on_ready=self.ready.set,
                )
            except (RuntimeError, OSError) as exc:  # reported by the main thread
                self.fuse_error = exc

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        fuse_thread = threading.Thread(target=_fuse, name="fuse", daemon=True)
        fuse_thread.start()
        announced = False
        while fuse_thread.is_alive() and not self.stop_requested:
            fuse_thread.join(0.2)
            if not announced and (
                self.ready.is_set() or (not self.node_mode and is_fuse(find_mount(self.mountpoint)))
            ):
                announced = True
                log.info(
                    "serving %s at %s (%s)%s",
                    ", ".join(self.served) or "no model",
                    self.mountpoint,
                    self.origin.describe(),
                    f"; left out: {', '.join(self.left_out)}" if self.left_out else "",
                )
                self.origin.start()
        if not self.stop_requested:
            if self.fuse_error is not None:
                log.error("FUSE mount failed: %s", self.fuse_error)
                return 1
            if self.node_mode:
                log.info("the node plugin ended the FUSE connection (volume unpublished); exiting")
                return 0
            log.error("%s was unmounted from outside; exiting", self.mountpoint)
            return 1
        self.origin.stop()
        if self.node_mode:
            # The mount is the node plugin's: it stays, and requests wait in the kernel until
            # a restarted sidecar takes the connection again. The FUSE loop sits in a read of
            # the descriptor, so the process ends without waiting for it.
            log.info("signal received: leaving the FUSE connection to the node plugin")
            self.exit_at_once = True
            return 0
        log.info("signal received: unmounting %s", self.mountpoint)
        # a signal right at start may come before libfuse has mounted: let the mount appear
        # first, else it would appear after our unmount and die with the process
        deadline = time.monotonic() + UNMOUNT_GRACE
        while (
            not announced
            and fuse_thread.is_alive()
            and not is_fuse(find_mount(self.mountpoint))
            and time.monotonic() < deadline
        ):
            fuse_thread.join(0.05)
        if not unmount(self.mountpoint):
            unmount(self.mountpoint, lazy=True)
        fuse_thread.join(UNMOUNT_GRACE)
        if fuse_thread.is_alive():
            # Our mount is gone but the FUSE connection lives on: a copy of the mount in
            # another mount namespace (propagated to a container, busy there) keeps it open.
            # Exiting closes /dev/fuse, which aborts the connection, so those copies fail
            # fast with ENOTCONN instead of hanging.
            self.exit_at_once = True
            if is_fuse(find_mount(self.mountpoint)):
                log.error("%s is still mounted after unmount; exiting anyway", self.mountpoint)
                return 1
            log.warning(
                "%s unmounted, but the FUSE connection is still referenced elsewhere "
                "(another mount namespace); closing it by exiting",
                self.mountpoint,
            )
        return 0

    def close(self) -> None:
        self.origin.close()


def run(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "node_socket", None) is None:
            # node mode: the mountpoint is the node plugin's mount, not ours to recover (and
            # it hangs every look until this process serves it)
            recover_mountpoint(str(args.mountpoint))
        service = MountService(args)
    except MountError as exc:
        print(f"mount: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        service.prepare()
        code = service.serve()
    except (MountError, CacheError) as exc:
        print(f"mount: {exc}", file=sys.stderr, flush=True)
        code = 1
    except OSError as exc:
        print(f"mount: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        service.close()
    if code != 0 or service.exit_at_once:
        # a FUSE loop still running must not keep a dying process (and its mount) alive
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
