"""What publishing a ``csi.modelcache.io`` volume to a pod does, and how it is undone.

The kubelet calls ``NodePublishVolume`` for each inline ``csi`` volume of a pod before the
pod's containers start, with the volume's ``volumeAttributes``, the pod's identity (the
CSIDriver sets ``podInfoOnMount``) and the data of the pod's ``nodePublishSecretRef`` Secret.
:class:`Publisher` turns that into a mount on the target path:

1. **Policy** (no I/O): the attributes name the models (``models``: ``name=uri,...``), the
   kind of volume (``kind``: ``view`` or ``fuse``) and which files (``include``: globs, as
   the warm-up's ``--include``; none: all). ``file://`` sources must lie under
   the roots the node allows (none by default); ``pvc://`` is not published by the node.
2. **Access check**, every time, even for a complete cache: each model's source is listed
   with *this pod's* credentials (only the credential keys of its Secret: the node's own
   credentials are never used for a pod, and endpoints such as ``HF_ENDPOINT`` come from the
   node, never from the pod) and the node's own name resolution. Refused: the publish fails
   with a permission error, whatever the cache holds. Unreachable: the cached copy is served
   only if the pod sends no credentials and the copy was fetched with none. The listing
   (after the include globs) is kept on the volume: it is what the pod's status shows.
3. **Fetch**: a model that is not complete (or changed at the source) is fetched into the
   node cache in the background, once per model however many pods ask (single-flight), with
   the credentials of the pod that started it. No publish waits for it: files appear in
   the volume as they complete (the kubelet's retry backoff, up to two minutes, would
   otherwise add to every cold start). A failed fetch shows as ``failed`` in the status of
   every volume of that model until a new publish of the model starts it again.
4. **Mount**:

   ``view``: a small read-only tmpfs on the target holding one directory per model, named
   by its cache key, each a read-only (nosuid, nodev) bind mount of that model's ``data/``
   in the node cache, which only ever holds complete, verified files. The pod sees its own
   models and nothing else of the cache, and cannot write anywhere.

   ``fuse``: ``/dev/fuse`` mounted read-only on the target (type ``fuse.modelcache``), its
   descriptor handed to the pod's unprivileged sidecar through a unix socket in the pod's
   ``modelcache-fuse-socket`` emptyDir (:mod:`sidecar.node.handover`), with the volume's
   live status (:meth:`Publisher.status`) on every connection.

   Each published model is pinned (a shared lock on the model, which the agent's eviction
   needs exclusively) until the volume is unpublished.

Unpublishing unmounts everything under the target and removes it; unknown or already
removed targets are fine (the kubelet retries and may call it twice).

Nothing here knows gRPC: errors are :class:`PublishError` with an :class:`ErrorKind` that
``sidecar.node.csi`` maps onto status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sidecar import journal
from sidecar.cache import CacheError, NodeCache, read_file_meta
from sidecar.layout import ANONYMOUS_MARKER, ModelDir
from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_spec
from sidecar.node import handover, mounts
from sidecar.node.flags import DRIVER_NAME
from sidecar.progress import Progress
from sidecar.sources import (
    RemoteFile,
    Source,
    SourceAccessError,
    SourceError,
    SourceUnavailableError,
    open_source,
)
from sidecar.sources.route import FetchSettings, source_wrapper
from sidecar.warmup import ModelReport, WarmupError, WarmupReport, plan_files, warm_models

log = logging.getLogger(__name__)

# volume_context keys the kubelet adds to an inline volume's volumeAttributes
EPHEMERAL_KEY: Final = "csi.storage.k8s.io/ephemeral"
POD_NAME_KEY: Final = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE_KEY: Final = "csi.storage.k8s.io/pod.namespace"
POD_UID_KEY: Final = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT_KEY: Final = "csi.storage.k8s.io/serviceAccount.name"
KUBELET_PREFIX: Final = "csi.storage.k8s.io/"

# the volume attributes of a csi.modelcache.io volume
MODELS_ATTR: Final = "models"
KIND_ATTR: Final = "kind"
KIND_VIEW: Final = "view"
KIND_FUSE: Final = "fuse"
KINDS: Final = (KIND_VIEW, KIND_FUSE)
#: ``NAME=key,...``: which keys of the pod's Secret hold which credential, when the
#: Secret's own key names differ (``HF_TOKEN=token``); by default the names themselves.
CREDENTIAL_KEYS_ATTR: Final = "credentialKeys"
#: ``glob,glob``: only the files matching one (path or file name), as the warm-up's
#: ``--include`` and ``modelcache.io/warmup-include``; empty: every file.
INCLUDE_ATTR: Final = "include"
ATTRIBUTES: Final = (MODELS_ATTR, KIND_ATTR, CREDENTIAL_KEYS_ATTR, INCLUDE_ATTR)
_MAX_GLOBS: Final = 64
_MAX_GLOB_LEN: Final = 256

# the states of a model in the volume status (the hand-over's JSON line)
STATE_PENDING: Final = "pending"
STATE_FETCHING: Final = "fetching"
STATE_COMPLETE: Final = "complete"
STATE_FAILED: Final = "failed"

#: Keys of the pod's Secret that count as its credentials; any other key is ignored.
CREDENTIAL_KEYS: Final = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
DEFAULT_CREDENTIAL_KEYS: Final = tuple((name, name) for name in CREDENTIAL_KEYS)
#: Variables of the node's own environment that would lend a pod the node's identity.
_NODE_IDENTITY_KEYS: Final = (
    *CREDENTIAL_KEYS,
    "HF_TOKEN_PATH",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)

_UID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class ErrorKind(enum.Enum):
    """Why a call failed, which decides the status code and whether the kubelet retries."""

    INVALID = "invalid"  # the request itself is wrong
    DENIED = "denied"  # this pod may not have this
    CONFLICT = "conflict"  # the target is published with something else
    PENDING = "pending"  # not ready yet (the socket's emptyDir, an eviction): retry
    UNAVAILABLE = "unavailable"  # the source cannot be reached now: retry
    SOURCE = "source"  # the source cannot be used as it is
    INTERNAL = "internal"  # the node side failed (disk, mount)


class PublishError(Exception):
    """A publish or unpublish that failed; the message is for ``kubectl describe pod``."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PodInfo:
    """Who the volume is for, from the kubelet's ``podInfoOnMount`` keys (may be empty)."""

    name: str = ""
    namespace: str = ""
    uid: str = ""
    service_account: str = ""

    def __str__(self) -> str:
        return f"pod {self.namespace}/{self.name}" if self.name else "the pod"


@dataclass(frozen=True)
class VolumeSpec:
    kind: str
    models: tuple[NamedModel, ...]
    pod: PodInfo
    #: credential name → key of the pod's Secret that holds it
    credential_keys: tuple[tuple[str, str], ...] = DEFAULT_CREDENTIAL_KEYS
    #: the include globs (none: every file)
    include: tuple[str, ...] = ()


@dataclass(frozen=True)
class PublishRequest:
    """What ``NodePublishVolume`` carries that the plugin uses."""

    volume_id: str
    target_path: str
    volume_context: Mapping[str, str]
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    readonly: bool = True


@dataclass(frozen=True)
class PluginConfig:
    """The node plugin's settings (command-line flags of ``python -m sidecar csi``)."""

    cache_dir: Path
    kubelet_root: Path = Path("/var/lib/kubelet")
    file_roots: tuple[Path, ...] = ()
    check_timeout: float = 30.0
    fetch_timeout: float = 3600.0
    parallel: int = 8
    #: seconds after a fetch's first failure before a status poll restarts it
    fetch_retry: float = 10.0
    #: how fills read the origin (peers; ``sidecar.sources.route``); None: the origin only
    fetch: FetchSettings | None = None


def parse_volume_context(ctx: Mapping[str, str]) -> VolumeSpec:
    """The volume's kind, models and pod; :class:`PublishError` (INVALID) naming the key."""
    if ctx.get(EPHEMERAL_KEY) != "true":
        raise PublishError(
            ErrorKind.INVALID,
            f"{DRIVER_NAME} publishes only inline ephemeral volumes (a `csi` volume in the "
            f"pod spec); {EPHEMERAL_KEY} is {ctx.get(EPHEMERAL_KEY)!r}",
        )
    unknown = sorted(k for k in ctx if not k.startswith(KUBELET_PREFIX) and k not in ATTRIBUTES)
    if unknown:
        raise PublishError(
            ErrorKind.INVALID,
            f"unknown volumeAttributes {', '.join(unknown)}; accepted: {', '.join(ATTRIBUTES)}",
        )
    kind = ctx.get(KIND_ATTR, KIND_VIEW)
    if kind not in KINDS:
        raise PublishError(
            ErrorKind.INVALID,
            f"volumeAttributes {KIND_ATTR}={kind!r} is not valid; accepted: {', '.join(KINDS)}",
        )
    spec = ctx.get(MODELS_ATTR, "")
    try:
        models = parse_model_spec(spec)
    except ModelSourceError as exc:
        raise PublishError(ErrorKind.INVALID, f"volumeAttributes {MODELS_ATTR}: {exc}") from None
    uid = ctx.get(POD_UID_KEY, "")
    if uid and not _UID_RE.match(uid):
        raise PublishError(ErrorKind.INVALID, f"{POD_UID_KEY} {uid!r} is not a pod uid")
    pod = PodInfo(
        name=ctx.get(POD_NAME_KEY, ""),
        namespace=ctx.get(POD_NAMESPACE_KEY, ""),
        uid=uid,
        service_account=ctx.get(SERVICE_ACCOUNT_KEY, ""),
    )
    return VolumeSpec(kind, tuple(models), pod, _parse_credential_keys(ctx), _parse_include(ctx))


def _parse_include(ctx: Mapping[str, str]) -> tuple[str, ...]:
    text = ctx.get(INCLUDE_ATTR, "").strip()
    if not text:
        return ()
    globs = [g.strip() for g in text.split(",")]
    for g in globs:
        if not g or len(g) > _MAX_GLOB_LEN or not g.isprintable():
            raise PublishError(
                ErrorKind.INVALID,
                f"volumeAttributes {INCLUDE_ATTR}: {g!r} is not a glob (comma-separated, "
                f"each 1-{_MAX_GLOB_LEN} printable characters)",
            )
    if len(globs) > _MAX_GLOBS:
        raise PublishError(
            ErrorKind.INVALID,
            f"volumeAttributes {INCLUDE_ATTR}: {len(globs)} globs, at most {_MAX_GLOBS}",
        )
    return tuple(dict.fromkeys(globs))


def _parse_credential_keys(ctx: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    text = ctx.get(CREDENTIAL_KEYS_ATTR, "").strip()
    if not text:
        return DEFAULT_CREDENTIAL_KEYS
    pairs: dict[str, str] = {}
    for entry in text.split(","):
        name, sep, key = (part.strip() for part in entry.partition("="))
        if not sep or name not in CREDENTIAL_KEYS or not key:
            raise PublishError(
                ErrorKind.INVALID,
                f"volumeAttributes {CREDENTIAL_KEYS_ATTR}: {entry.strip()!r} is not NAME=key "
                f"with NAME one of {', '.join(CREDENTIAL_KEYS)}",
            )
        pairs[name] = key
    return tuple(pairs.items())


def pod_env(
    secrets: Mapping[str, str],
    node_env: Mapping[str, str],
    credential_keys: Sequence[tuple[str, str]] = DEFAULT_CREDENTIAL_KEYS,
) -> dict[str, str]:
    """The environment the sources see for one pod: the node's configuration (endpoints,
    region, proxies) without any of the node's own credentials, plus the pod's credentials
    from its Secret (``credential_keys``: credential name → Secret key). Nothing else of the
    Secret is used: a pod cannot point the check at a hub or S3 endpoint of its choosing."""
    env = {k: v for k, v in node_env.items() if k not in _NODE_IDENTITY_KEYS}
    env.update({name: secrets[key] for name, key in credential_keys if secrets.get(key)})
    return env


def check_file_roots(models: Sequence[NamedModel], roots: Sequence[Path]) -> None:
    """``file://`` sources only under ``roots`` (after resolving symlinks); no ``pvc://``."""
    real_roots = [os.path.realpath(r) for r in roots]
    for m in models:
        if m.source.scheme == "pvc":
            raise PublishError(
                ErrorKind.INVALID,
                f"model {m.name!r}: {m.source.uri}: pvc:// sources are not published by the "
                "node plugin (a claim is mounted into the pod itself)",
            )
        if m.source.scheme != "file":
            continue
        real = os.path.realpath(m.source.location)
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in real_roots):
            allowed = ", ".join(str(r) for r in roots) or "none are configured"
            raise PublishError(
                ErrorKind.DENIED,
                f"model {m.name!r}: file:// source {m.source.uri} is outside the directories "
                f"this node allows for file:// sources ({allowed})",
            )


#: a fetch is single-flight per model and include globs
_FetchKey = tuple[str, tuple[str, ...]]


class _Fetch:
    """One background fill of one model (its files matching ``include``) into the cache."""

    def __init__(self, model: NamedModel, include: tuple[str, ...]) -> None:
        self.model = model
        self.include = include
        self.progress = Progress(emit=lambda line: log.info("%s: %s", model.source.uri, line))
        self.error: str | None = None
        self.task: asyncio.Task[None] | None = None
        #: how many fetches of this model and globs failed in a row before this one
        self.failures = 0
        #: ``time.monotonic()`` when this fetch failed (None: it has not)
        self.failed_at: float | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def rate(self) -> float:
        """Bytes per second this fetch downloaded since its listing (0 before)."""
        p = self.progress
        if not p.fetched_bytes:
            return 0.0
        return p.fetched_bytes / max(p.clock() - p.started, 1e-6)


@dataclass(frozen=True)
class _Listing:
    """What the access check found for one model of one volume."""

    #: the files the pod gets (after the include globs), as the source listed them
    files: tuple[RemoteFile, ...]
    #: hf:// only: the commit the listing resolved (None: served from the cache unlisted)
    commit: str | None = None
    #: complete in the cache with exactly these files at the time of the check
    current: bool = False
    #: the check read the source without credentials
    anonymous: bool = False


@dataclass
class _Volume:
    volume_id: str
    target: Path
    spec: VolumeSpec
    pins: contextlib.ExitStack
    listings: dict[str, _Listing] = field(default_factory=dict)
    #: the pod's credentials as checked at publish (kept in memory only, to retry a
    #: failed fetch for this pod)
    env: dict[str, str] = field(default_factory=dict)
    fuse_fd: int = -1
    last_peer: int = 0
    listener: socket.socket | None = None
    socket_path: Path | None = None
    serve_task: asyncio.Task[None] | None = None


_SEVERITY: Final = (
    ErrorKind.DENIED,
    ErrorKind.INVALID,
    ErrorKind.SOURCE,
    ErrorKind.INTERNAL,
    ErrorKind.UNAVAILABLE,
    ErrorKind.PENDING,
)


class Publisher:
    """Publishes and unpublishes volumes; one per node plugin process, on its event loop."""

    def __init__(
        self,
        config: PluginConfig,
        *,
        cache: NodeCache | None = None,
        node_env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.cache = cache or NodeCache(config.cache_dir)
        self.node_env = dict(os.environ if node_env is None else node_env)
        self._fetches: dict[_FetchKey, _Fetch] = {}
        self._volumes: dict[Path, _Volume] = {}
        self._locks: dict[Path, asyncio.Lock] = {}

    # ---- the two calls ------------------------------------------------------------------

    async def publish(self, req: PublishRequest) -> None:
        if not req.volume_id:
            raise PublishError(ErrorKind.INVALID, "volume_id is empty")
        target = self._target(req.target_path)
        spec = parse_volume_context(req.volume_context)
        check_file_roots(spec.models, self.config.file_roots)
        async with self._lock(target):
            known = self._volumes.get(target)
            if known is not None:
                if known.volume_id == req.volume_id and known.spec == spec:
                    return  # published already: the kubelet retried after a lost answer
                raise PublishError(
                    ErrorKind.CONFLICT,
                    f"{target} is already published as volume {known.volume_id} with other "
                    "attributes",
                )
            socket_dir = self._socket_dir(spec.pod) if spec.kind == KIND_FUSE else None
            env = pod_env(req.secrets, self.node_env, spec.credential_keys)
            listings = await self._check_models(spec, env)
            vol = _Volume(
                req.volume_id,
                target,
                spec,
                contextlib.ExitStack(),
                listings,
                env=dict(env),
            )
            try:
                self._pin(vol)
                if mounts.mounts_under(target):
                    # left over from an earlier run of the plugin that we no longer track
                    await asyncio.to_thread(mounts.unmount_tree, target)
                if socket_dir is None:
                    await asyncio.to_thread(self._mount_view, vol)
                else:
                    await asyncio.to_thread(self._mount_fuse, vol, socket_dir)
                    self._start_handover(vol)
            except BaseException:
                await self._teardown(vol)
                raise
            self._volumes[target] = vol
            for m in spec.models:
                self.cache.touch(m)
        log.info(
            "published volume %s (%s) for %s at %s: %s",
            req.volume_id,
            spec.kind,
            spec.pod,
            target,
            ", ".join(m.to_arg() for m in spec.models),
        )

    async def unpublish(self, volume_id: str, target_path: str) -> None:
        if not volume_id:
            raise PublishError(ErrorKind.INVALID, "volume_id is empty")
        target = self._target(target_path)
        lock = self._lock(target)
        async with lock:
            vol = self._volumes.pop(target, None)
            if vol is None:
                vol = _Volume(
                    volume_id, target, VolumeSpec("", (), PodInfo()), contextlib.ExitStack()
                )
            await self._teardown(vol)
        if not lock.locked():
            self._locks.pop(target, None)  # the kubelet never reuses a pod's target
        log.info("unpublished volume %s at %s", volume_id, target)

    async def aclose(self) -> None:
        """Stop background fetches and hand-over listeners; mounts stay (the kubelet owns
        their lifetime, and a restarted plugin unpublishes them when asked)."""
        for vol in self._volumes.values():
            self._stop_handover(vol)
        tasks = [f.task for f in self._fetches.values() if f.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- validation ---------------------------------------------------------------------

    def _lock(self, target: Path) -> asyncio.Lock:
        return self._locks.setdefault(target, asyncio.Lock())

    def _target(self, target_path: str) -> Path:
        """The target as given, if it is a plain absolute path under the kubelet's pods."""
        pods = os.path.normpath(self.config.kubelet_root / "pods")
        if (
            not target_path.startswith("/")
            or os.path.normpath(target_path) != target_path.rstrip("/")
            or not target_path.startswith(pods + "/")
        ):
            raise PublishError(
                ErrorKind.INVALID,
                f"target_path {target_path!r} is not a normalized path under {pods}/",
            )
        return Path(target_path.rstrip("/"))

    def _socket_dir(self, pod: PodInfo) -> Path:
        if not pod.uid:
            raise PublishError(
                ErrorKind.INVALID,
                f"kind={KIND_FUSE} needs the pod's uid ({POD_UID_KEY}): the CSIDriver object "
                f"{DRIVER_NAME} must set podInfoOnMount: true",
            )
        d = (
            self.config.kubelet_root
            / "pods"
            / pod.uid
            / "volumes"
            / "kubernetes.io~empty-dir"
            / handover.SOCKET_VOLUME
        )
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            raise PublishError(
                ErrorKind.PENDING,
                f"waiting for the emptyDir volume {handover.SOCKET_VOLUME!r} of {pod} "
                f"({d}) that carries the FUSE hand-over socket",
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise PublishError(ErrorKind.INVALID, f"{d} is not a directory")
        return d

    # ---- access check and fetch ---------------------------------------------------------

    async def _check_models(self, spec: VolumeSpec, env: Mapping[str, str]) -> dict[str, _Listing]:
        """Check every model's access (starting the fetch of any that is not complete);
        return name → what the check listed. Every failure is reported, the gravest first."""
        results = await asyncio.gather(
            *(self._check_model(m, spec, env) for m in spec.models), return_exceptions=True
        )
        errors: list[PublishError] = []
        listings: dict[str, _Listing] = {}
        for m, res in zip(spec.models, results, strict=True):
            if isinstance(res, PublishError):
                errors.append(res)
            elif isinstance(res, BaseException):
                raise res
            else:
                listings[m.name] = res
        if errors:
            kind = min((e.kind for e in errors), key=_SEVERITY.index)
            raise PublishError(kind, "; ".join(str(e) for e in errors))
        return listings

    async def _check_model(
        self, model: NamedModel, spec: VolumeSpec, env: Mapping[str, str]
    ) -> _Listing:
        """Raise unless the pod may read ``model`` now; return the files it gets, starting
        their fetch unless they are complete in the cache."""
        pod = spec.pod
        what = f"model {model.name!r} ({model.source.uri})"
        src = open_source(
            model,
            env=env,
            read_timeout=self.config.check_timeout,
            file_roots=self.config.file_roots,
            private_dirs=[self.config.cache_dir],
        )
        anonymous = not getattr(src, "uses_credentials", True)
        try:
            async with asyncio.timeout(self.config.check_timeout):
                listed = await src.list_files()
        except SourceAccessError as exc:
            raise PublishError(
                ErrorKind.DENIED,
                f"{pod} may not read {what} with its own credentials: {_detail(exc, model)}",
            ) from None
        except (SourceUnavailableError, TimeoutError) as exc:
            cached = self._cached_listing(model, spec.include)
            if anonymous and self._fetched_anonymously(model) and cached is not None:
                log.warning(
                    "%s: source unreachable (%s); serving the complete cached copy to %s "
                    "(fetched with no credentials, and the pod sends none)",
                    what,
                    _detail(exc, model) or "timed out",
                    pod,
                )
                return cached
            raise PublishError(
                ErrorKind.UNAVAILABLE,
                f"cannot check that {pod} may read {what}: the source is unreachable: "
                f"{_detail(exc, model) or f'no answer in {self.config.check_timeout:g}s'}",
            ) from None
        except SourceError as exc:
            raise PublishError(ErrorKind.SOURCE, f"{what}: {_detail(exc, model)}") from None
        finally:
            await src.aclose()
        if not listed:
            raise PublishError(ErrorKind.SOURCE, f"{what}: the source lists no files")
        plan = plan_files(listed, spec.include)
        if not plan:
            raise PublishError(
                ErrorKind.SOURCE,
                f"{what}: volumeAttributes {INCLUDE_ATTR} {','.join(spec.include)} selects "
                f"none of the {len(listed)} file(s) the source lists; check the globs",
            )
        commit = getattr(src, "commit", None)
        current = await asyncio.to_thread(self._is_current, model, listed, plan, src)
        if not current:
            self._ensure_fetch(model, spec.include, env, anonymous=anonymous)
        elif spec.kind == KIND_VIEW:  # one per pod (a pod has one view): the agent's hits
            hit = ModelReport(
                model.name,
                model.source.uri,
                model.source.cache_key,
                files=len(plan),
                total_bytes=sum(f.size for f in plan),
                ok=True,
            )
            journal.record_warmup(self.cache.cache_dir, WarmupReport(models=[hit]))
        return _Listing(
            tuple(plan), commit if isinstance(commit, str) and commit else None, current, anonymous
        )

    def _cached_listing(self, model: NamedModel, include: Sequence[str]) -> _Listing | None:
        """The complete cached copy's files matching ``include``, or None (not complete, or
        it holds none of them)."""
        manifest = self.cache.read_manifest(model)
        if manifest is None or not self.cache.is_complete(model):
            return None
        try:
            files = [RemoteFile(e["path"], e["size"], e.get("sha256")) for e in manifest["files"]]
        except (KeyError, TypeError):
            return None
        plan = plan_files(files, include)
        return _Listing(tuple(plan), None, True) if plan else None

    def _is_current(
        self,
        model: NamedModel,
        listed: Sequence[RemoteFile],
        plan: Sequence[RemoteFile],
        src: Source | None = None,
    ) -> bool:
        """Complete in the cache with every planned file as the source lists it now,
        nothing the source no longer lists, and every planned file unchanged on disk since
        it was verified (its stamp: a file damaged in place, even keeping its size, is
        verified again or fetched again by the fill this starts)."""
        manifest = self.cache.read_manifest(model)
        if manifest is None or not self.cache.is_complete(model):
            return False
        try:
            cached = {e["path"]: (e["size"], e.get("sha256")) for e in manifest["files"]}
        except (KeyError, TypeError):
            return False
        if not set(cached) <= {f.path for f in listed}:
            return False
        for f in plan:
            if f.path not in cached:
                return False
            size, sha = cached[f.path]
            if size != f.size or (f.sha256 and sha and sha != f.sha256):
                return False
        return all(self.cache.is_file_current(model, src, f) for f in plan)

    def _fetched_anonymously(self, model: NamedModel) -> bool:
        return (self.cache.model_dir(model).root / ANONYMOUS_MARKER).is_file()

    def _ensure_fetch(
        self,
        model: NamedModel,
        include: tuple[str, ...],
        env: Mapping[str, str],
        *,
        anonymous: bool,
    ) -> None:
        """Start the model's fetch unless one runs (single flight); a failed one is
        replaced: every publish of a model whose fetch failed starts it again."""
        key = (model.source.cache_key, include)
        fetch = self._fetches.get(key)
        if fetch is not None and fetch.running:
            return  # single flight: the running fetch serves every pod that may read it
        failures = fetch.failures + 1 if fetch is not None and fetch.error else 0
        fetch = _Fetch(model, include)
        fetch.failures = failures
        fetch.task = asyncio.get_running_loop().create_task(
            self._fill(fetch, dict(env), anonymous), name=f"fetch {model.source.uri}"
        )
        self._fetches[key] = fetch

    async def _fill(self, fetch: _Fetch, env: dict[str, str], anonymous: bool) -> None:
        model = fetch.model
        marker = self.cache.model_dir(model).root / ANONYMOUS_MARKER
        started = time.monotonic()
        try:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()  # the copy is being replaced: it is no longer the anonymous one
            report = await warm_models(
                self.cache,
                [model],
                include=fetch.include,
                parallel=self.config.parallel,
                timeout=self.config.fetch_timeout,
                progress=fetch.progress,
                env=env,
                file_roots=self.config.file_roots,
                wrap=source_wrapper(self.config.fetch),
            )
            if anonymous:
                marker.touch()
            journal.record_warmup(self.cache.cache_dir, report)
        except WarmupError as exc:
            fetch.error = "; ".join(f.message for f in exc.problems) or str(exc)
            journal.record_warmup(
                self.cache.cache_dir, exc.report or WarmupReport(failures=exc.problems)
            )
        except (OSError, CacheError) as exc:
            fetch.error = str(exc)
        except Exception as exc:
            log.exception("fetching %s failed", model.source.uri)
            fetch.error = f"{type(exc).__name__}: {exc}"
        if fetch.error:
            fetch.failed_at = time.monotonic()
            log.warning("fetching %s failed: %s", model.source.uri, fetch.error)
            return  # kept: the status says "failed" until a publish or a retry restarts it
        log.info("fetched %s in %.1fs", model.source.uri, time.monotonic() - started)
        key = (model.source.cache_key, fetch.include)
        if self._fetches.get(key) is fetch:
            del self._fetches[key]

    # ---- status -------------------------------------------------------------------------

    def fetches_of(self, vol: _Volume) -> dict[str, _Fetch | None]:
        """Model name → the fetch its status follows (taken on the event loop)."""
        return {m.name: self._fetch_for(m, vol.spec.include) for m in vol.spec.models}

    def status(self, vol: _Volume, fetches: Mapping[str, _Fetch | None]) -> dict[str, Any]:
        """The volume's live status (the hand-over's JSON line) given :meth:`fetches_of`;
        blocking (it stats each listed file), so the event loop runs it in a thread."""
        return {
            "volume_id": vol.volume_id,
            "models": [
                self._model_status(m, vol.listings.get(m.name), fetches[m.name])
                for m in vol.spec.models
            ],
        }

    def _fetch_for(self, model: NamedModel, include: tuple[str, ...]) -> _Fetch | None:
        """The fetch of the volume's model and globs; else a running one of the same model
        with other globs (it may be fetching a file this volume lists again, say one that
        failed verification and was moved out of ``data/``)."""
        key = model.source.cache_key
        fetch = self._fetches.get((key, include))
        if fetch is not None:
            return fetch
        others = [f for (k, _), f in self._fetches.items() if k == key and f.running]
        return others[0] if others else None

    def _model_status(
        self, model: NamedModel, listing: _Listing | None, fetch: _Fetch | None
    ) -> dict[str, Any]:
        src = model.source
        hub = src.scheme == "hf"
        out: dict[str, Any] = {
            "name": model.name,
            "uri": src.uri,
            "cache_key": src.cache_key,
            "state": STATE_PENDING,
            "complete": False,
            "error": None,
            "bytes_done": 0,
            "bytes_total": 0,
            "rate": 0.0,
            "revision": (src.revision or "main") if hub else None,
            "commit": None,
            "files": [],
        }
        if listing is None:
            return out
        done = self._complete_files(model, listing)
        total = sum(f.size for f in listing.files)
        done_bytes = sum(f.size for f in listing.files if f.path in done)
        complete = len(done) == len(listing.files)
        error: str | None = None
        if complete:
            state = STATE_COMPLETE
        elif fetch is not None and fetch.error is not None:
            state, error = STATE_FAILED, fetch.error
        elif fetch is not None:
            state = STATE_FETCHING
            # the fetch's own count includes the parts of files still in flight
            done_bytes = max(done_bytes, min(fetch.progress.done_bytes, total - 1))
            out["rate"] = round(fetch.rate(), 1)
        else:
            missing = [f.path for f in listing.files if f.path not in done]
            state = STATE_FAILED
            error = (
                f"the fetch ended without {len(missing)} file(s) of the listing "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the "
                "source changed after the volume was published; publish it again"
            )
        out.update(
            state=state,
            complete=complete,
            error=error,
            bytes_done=done_bytes,
            bytes_total=total,
            files=[
                {"path": f.path, "size": f.size, "complete": f.path in done} for f in listing.files
            ],
        )
        if hub:
            md = self.cache.model_dir(model)
            recorded = _recorded_commit(md, [f.path for f in listing.files if f.path in done])
            if listing.commit is None:
                out["commit"] = recorded
            else:
                out["commit"] = recorded if complete and recorded else listing.commit
        return out

    def _complete_files(self, model: NamedModel, listing: _Listing) -> set[str]:
        """Paths of the listing that are in the model's ``data/`` as listed."""
        md = self.cache.model_dir(model)
        manifest = self.cache.read_manifest(model) or {}
        recorded: dict[str, tuple[Any, Any]] = {}
        for e in manifest.get("files", []):
            if isinstance(e, dict) and isinstance(e.get("path"), str):
                recorded[e["path"]] = (e.get("size"), e.get("sha256"))
        done: set[str] = set()
        for f in listing.files:
            try:
                if md.data_file(f.path).stat().st_size != f.size:
                    continue
            except (OSError, ValueError):
                continue
            if not self.cache.is_file_current(model, None, f):
                continue  # changed on disk since it was verified: the fill checks it again
            size, sha = recorded.get(f.path, (None, None))
            if f.sha256 is None or (size == f.size and sha == f.sha256):
                done.add(f.path)
                continue
            meta = read_file_meta(md, f.path)  # not in the manifest yet: as fetched
            if meta is not None and meta.get("sha256") in (None, f.sha256):
                done.add(f.path)
        return done

    # ---- mounts -------------------------------------------------------------------------

    def _pin(self, vol: _Volume) -> None:
        """Hold every model's shared lock so eviction leaves it alone while published."""
        for m in vol.spec.models:
            if not vol.pins.enter_context(self.cache.hold(m, blocking=False)):
                raise PublishError(
                    ErrorKind.PENDING,
                    f"model {m.name!r} ({m.source.uri}) is being evicted from the node cache",
                )

    def _mount_view(self, vol: _Volume) -> None:
        target = vol.target
        try:
            _make_target(target)
            mounts.mount_view_root(target)
            for key, m in {m.source.cache_key: m for m in vol.spec.models}.items():
                # data/ exists before the first file lands, so the bind shows them as they do
                data = self.cache.prepare_model(m).data
                (target / key).mkdir(mode=0o755)
                mounts.bind_readonly(data, target / key)
            mounts.seal_view_root(target)
        except (OSError, CacheError) as exc:
            raise PublishError(ErrorKind.INTERNAL, f"cannot publish {target}: {exc}") from None

    def _mount_fuse(self, vol: _Volume, socket_dir: Path) -> None:
        target = vol.target
        try:
            _make_target(target)
            vol.fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            mounts.mount_fuse(target, vol.fuse_fd)
            vol.socket_path = socket_dir / handover.SOCKET_NAME
            vol.listener = handover.listen(vol.socket_path)
        except (OSError, handover.HandoverError) as exc:
            raise PublishError(ErrorKind.INTERNAL, f"cannot publish {target}: {exc}") from None

    def _start_handover(self, vol: _Volume) -> None:
        vol.serve_task = asyncio.get_running_loop().create_task(
            self._serve_handover(vol), name=f"hand-over {vol.volume_id}"
        )

    async def _serve_handover(self, vol: _Volume) -> None:
        """Give the descriptor and the live status to every connection until the volume is
        unpublished; one connection at a time, each sent from a thread (a pod that does not
        read holds up only its own volume, for at most ``handover.SEND_TIMEOUT``)."""
        assert vol.listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(vol.listener)
            # the thread owns its own duplicate: an unpublish meanwhile closes only ours
            try:
                fd = os.dup(vol.fuse_fd)
            except OSError as exc:
                log.warning("hand-over of volume %s failed: %s", vol.volume_id, exc)
                conn.close()
                continue
            self._retry_failed(vol)
            await asyncio.to_thread(self._hand_over, vol, conn, fd, self.fetches_of(vol))

    def _retry_failed(self, vol: _Volume) -> None:
        """Start again, with this pod's credentials, a failed fetch of one of its models
        once its back-off has passed (:func:`retry_delay`). The pod's warm-up polls the
        status, and the kubelet restarts a failed warm-up without publishing the volume
        again: without this a source that was down for a minute would hold the pod until
        it is recreated."""
        now = time.monotonic()
        for m in vol.spec.models:
            fetch = self._fetches.get((m.source.cache_key, vol.spec.include))
            listing = vol.listings.get(m.name)
            if (
                fetch is not None
                and listing is not None
                and fetch.failed_at is not None
                and now - fetch.failed_at
                >= retry_delay(fetch.failures, first=self.config.fetch_retry)
            ):
                log.info(
                    "retrying the fetch of %s for %s (%d failure(s) so far)",
                    m.source.uri,
                    vol.spec.pod,
                    fetch.failures + 1,
                )
                self._ensure_fetch(m, vol.spec.include, vol.env, anonymous=listing.anonymous)

    def _hand_over(
        self,
        vol: _Volume,
        conn: socket.socket,
        fd: int,
        fetches: Mapping[str, _Fetch | None],
    ) -> None:
        try:
            pid, uid, _gid = _peer(conn)
            handover.send_fd(conn, fd, self.status(vol, fetches))
            # a warm-up polls the status about once a second: one line per process
            new_peer, vol.last_peer = pid != vol.last_peer, pid
            log.log(
                logging.INFO if new_peer else logging.DEBUG,
                "handed the FUSE descriptor and status of volume %s to pid %d (uid %d)",
                vol.volume_id,
                pid,
                uid,
            )
        except (OSError, handover.HandoverError) as exc:
            log.warning("hand-over of volume %s failed: %s", vol.volume_id, exc)
        except Exception:
            log.exception("hand-over of volume %s failed", vol.volume_id)
        finally:
            conn.close()
            os.close(fd)

    def _stop_handover(self, vol: _Volume) -> None:
        if vol.serve_task is not None:
            vol.serve_task.cancel()
            vol.serve_task = None
        if vol.listener is not None:
            vol.listener.close()
            vol.listener = None
        if vol.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(vol.socket_path)
            vol.socket_path = None

    async def _teardown(self, vol: _Volume) -> None:
        """Undo whatever of a publish exists: listener, mounts, target, descriptor, pins."""
        self._stop_handover(vol)
        try:
            await asyncio.to_thread(mounts.unmount_tree, vol.target)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(vol.target)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise PublishError(
                    ErrorKind.INTERNAL,
                    f"{vol.target} is not a mount of this plugin and is not empty; left alone",
                ) from None
            raise PublishError(
                ErrorKind.INTERNAL, f"cannot unpublish {vol.target}: {exc}"
            ) from None
        finally:
            if vol.fuse_fd >= 0:
                os.close(vol.fuse_fd)
                vol.fuse_fd = -1
            vol.pins.close()


#: the longest back-off between retries of a failed fetch (seconds)
RETRY_MAX: Final = 300.0


def retry_delay(failures_before: int, *, first: float = 10.0) -> float:
    """Seconds after a failure before a status connection restarts the fetch: ``first``
    (``--fetch-retry``, 10 s) after the first failure, doubling, at most 5 minutes (a
    source that stays down costs one listing every 5 minutes per model)."""
    return float(min(first * 2.0 ** min(failures_before, 16), RETRY_MAX))


def _make_target(target: Path) -> None:
    """Create the target (the kubelet made its parent); never mount through a symlink."""
    target.mkdir(mode=0o755, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(target).st_mode):
        raise PublishError(ErrorKind.INVALID, f"target_path {target} is not a directory")


def _peer(conn: socket.socket) -> tuple[int, int, int]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _recorded_commit(md: ModelDir, paths: Sequence[str]) -> str | None:
    """The hub commit complete files were fetched at (their ``version``), when they agree."""
    seen: set[str] = set()
    for path in paths:
        meta = read_file_meta(md, path)
        version = meta.get("version") if meta is not None else None
        if isinstance(version, str) and version:
            seen.add(version)
    return seen.pop() if len(seen) == 1 else None


def _detail(exc: BaseException, model: NamedModel) -> str:
    """The error text without the URI the source classes start their messages with."""
    text = str(exc)
    for prefix in (model.source.uri, f"{model.source.scheme}://{model.source.location}"):
        text = text.removeprefix(f"{prefix}: ")
    return text
