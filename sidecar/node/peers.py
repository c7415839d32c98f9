"""Peer fetch between node agents: the server, the client and how holders are found.

A node that fetches a model can take its bytes from other nodes' caches instead of the
origin (``sidecar.sources.peer.PeerSource`` decides which range comes from where). This
module is the network side of that:

* :class:`PeerServer`, in every agent: HTTPS with mutual TLS. It serves, read-only and only
  from the node cache, a model's complete files from ``data/`` (only while unchanged since
  they were verified: the stamp in ``.locks/<id>.meta``) and the parts of a file still being
  fetched that ``.partial/<id>.json`` records as written and fdatasynced, with ``Range``
  support. It waits (``wait=``, bounded) for parts that are being fetched. A request names
  the file's size, sha256 and version as the origin lists them, and nothing of another
  version is ever served.
* :class:`PeerTLS`: every agent has its own certificate, issued with the project's CA code
  (``certs.issue``) from the agents' CA (its own CA, not the webhook's), valid both as server
  and as client, naming the node's address. Both sides verify the other against that CA, so
  only agents can fetch: pods hold no such certificate and fail the handshake.
* Holders (:func:`holders_of`): a node labelled ``cache.modelcache.io/<key>=ready`` holds the
  model; a node whose annotation ``fetching.modelcache.io/<key>`` reads ``fetching <time>``
  (renewed every few seconds while it fetches, stale after :data:`ANNOUNCE_TTL`) holds part
  of it; ``complete <time>`` bridges the time until the agent's next pass labels it. Each
  agent publishes where its server listens in the node annotation ``modelcache.io/peer``.
  All of it is read with one node list through the Kubernetes API, at most once a second
  per process (:class:`KubePeerNetwork`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from sidecar.agent import LABEL_PREFIX, LABEL_READY
from sidecar.cache import NodeCache, file_stamp, read_file_meta
from sidecar.layout import ANONYMOUS_MARKER, ModelDir, UnsafePathError, file_id, safe_relpath
from sidecar.sources import RemoteFile
from sidecar.sources.peer import Peer, PeerUnavailableError

log = logging.getLogger(__name__)

#: Node annotation: where this node's peer server listens (``https://IP:PORT``).
PEER_ANNOTATION: Final = "modelcache.io/peer"
#: Node annotation prefix: ``fetching.modelcache.io/<key>: "fetching <unix time>"`` while
#: the node fetches the model, ``"complete <unix time>"`` once it has it all.
FETCHING_PREFIX: Final = "fetching.modelcache.io/"
FETCHING: Final = "fetching"
COMPLETE: Final = "complete"
#: Seconds a ``fetching`` announcement counts after its last renewal.
ANNOUNCE_TTL: Final = 30.0
#: Seconds a ``complete`` announcement counts (the agent labels the node well before).
COMPLETE_TTL: Final = 900.0
#: Longest wait a client may ask of the server for parts being fetched.
MAX_WAIT: Final = 60.0
#: Largest range of a file still being fetched served in one answer (read into memory).
MAX_PARTIAL_RANGE: Final = 64 << 20
#: Under the cache directory: ``peers/<key>/<file id>.<start>-<end>``, one empty file per
#: range this node reads from the origin while it fetches (its mtime: when it was claimed).
CLAIMS_DIR: Final = "peers"
#: Seconds a claim counts: a fetch that died without a word stops holding the others back.
CLAIM_TTL: Final = 120.0
#: Names of the files in ``--peer-tls-dir``.
CA_CERT_FILE: Final = "ca.crt"
CA_KEY_FILE: Final = "ca.key"
TLS_CERT_FILE: Final = "tls.crt"
TLS_KEY_FILE: Final = "tls.key"
MERGE_PATCH: Final = "application/merge-patch+json"

_KEY_RE: Final = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_RANGE_RE: Final = re.compile(r"^bytes=(\d+)-(\d+)$")
_CONTENT_RANGE_RE: Final = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_CHUNK: Final = 1 << 20
#: Seconds a failed node list is not tried again (the fetch reads the origin meanwhile).
_LIST_BACKOFF: Final = 5.0
#: API answers worth another try
_TRANSIENT: Final = frozenset({0, 408, 429, 500, 502, 503, 504})
T = TypeVar("T")


class PeerSetupError(ValueError):
    """The peer settings cannot be used (TLS files, listen address); one clear line."""


# ---- announcements and holders (pure) ------------------------------------------------------


def fetching_annotation(key: str) -> str:
    return FETCHING_PREFIX + key


def announcement(state: str, now: float) -> str:
    return f"{state} {now:.0f}"


def parse_announcement(value: str | None, now: float) -> str | None:
    """``fetching`` or ``complete`` when the announcement is fresh, else None."""
    if not value:
        return None
    state, _, stamp = value.partition(" ")
    try:
        age = now - float(stamp)
    except ValueError:
        return None
    if state == FETCHING and age <= ANNOUNCE_TTL:
        return FETCHING
    if state == COMPLETE and age <= COMPLETE_TTL:
        return COMPLETE
    return None


def valid_peer_url(value: str | None) -> str | None:
    """``https://IP:PORT`` as the agents write it, or None."""
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        return None
    try:
        if parts.port is None:
            return None
    except ValueError:
        return None
    return value.rstrip("/")


@dataclass(frozen=True)
class NodeInfo:
    """What peer discovery reads of a Node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


def holders_of(nodes: Iterable[NodeInfo], key: str, now: float) -> list[Peer]:
    """The nodes that hold ``key`` (complete or fetching) and say where their server is."""
    peers = []
    for n in nodes:
        url = valid_peer_url(n.annotations.get(PEER_ANNOTATION))
        if url is None:
            continue
        state = parse_announcement(n.annotations.get(fetching_annotation(key)), now)
        complete = n.labels.get(LABEL_PREFIX + key) == LABEL_READY or state == COMPLETE
        fetching = state == FETCHING and not complete
        if complete or fetching:
            peers.append(Peer(n.name, url, complete=complete, fetching=fetching))
    return sorted(peers, key=lambda p: p.node)


def stale_announcements(info: NodeInfo, now: float) -> dict[str, None]:
    """The merge-patch that removes this node's announcements that no longer count (a fetch
    that stopped without a word, a completion the label now says)."""
    patch: dict[str, None] = {}
    for name, value in info.annotations.items():
        if not name.startswith(FETCHING_PREFIX):
            continue
        key = name.removeprefix(FETCHING_PREFIX)
        state = parse_announcement(value, now)
        labelled = info.labels.get(LABEL_PREFIX + key) == LABEL_READY
        if state is None or (state == COMPLETE and labelled):
            patch[name] = None
    return patch


# ---- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerTLS:
    """The agents' CA and this agent's certificate (server and client), PEM."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @classmethod
    def issue(cls, ca_pem: bytes, ca_key_pem: bytes, *, node: str, ips: Sequence[str]) -> PeerTLS:
        """A fresh certificate for this node, signed by the agents' CA."""
        from certs.issue import CertError, issue_leaf

        try:
            cert, key = issue_leaf(
                ca_pem,
                ca_key_pem,
                "modelcache-peer",
                "modelcache-system",
                dns=[node],
                ips=list(ips),
                days=365,
                client=True,
            )
        except CertError as exc:
            raise PeerSetupError(f"cannot issue this agent's peer certificate: {exc}") from None
        return cls(ca_pem, cert, key)

    @classmethod
    def from_dir(cls, directory: Path, *, node: str, ips: Sequence[str]) -> PeerTLS:
        """``ca.crt`` plus either ``tls.crt``/``tls.key`` (issued beforehand for this node)
        or ``ca.key`` (then this agent issues its own certificate at start)."""
        try:
            ca = (directory / CA_CERT_FILE).read_bytes()
            if (directory / TLS_CERT_FILE).is_file():
                return cls(
                    ca,
                    (directory / TLS_CERT_FILE).read_bytes(),
                    (directory / TLS_KEY_FILE).read_bytes(),
                )
            ca_key = (directory / CA_KEY_FILE).read_bytes()
        except OSError as exc:
            raise PeerSetupError(
                f"--peer-tls-dir {directory}: {exc.strerror or exc} ({exc.filename}); it must "
                f"hold {CA_CERT_FILE} and either {TLS_CERT_FILE}+{TLS_KEY_FILE} or {CA_KEY_FILE}"
            ) from None
        return cls.issue(ca, ca_key, node=node, ips=ips)

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(purpose, cadata=self.ca_pem.decode())
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            # ssl loads a key pair only from files: a private directory, removed at once
            with tempfile.TemporaryDirectory(prefix="modelcache-peer-") as tmp:
                cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
                cert.write_bytes(self.cert_pem)
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(self.key_pem)
                ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise PeerSetupError(
                f"peer TLS: the CA or this agent's pair is unusable: {exc}"
            ) from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Requires a client certificate from the agents' CA (so no pod can connect)."""
        ctx = self._context(ssl.Purpose.CLIENT_AUTH)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Presents this agent's certificate; the server must name the address dialled."""
        return self._context(ssl.Purpose.SERVER_AUTH)


# ---- claims: ranges a node reads from the origin now ---------------------------------------------


def claims_dir(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / CLAIMS_DIR / key


def write_claim(cache_dir: Path, key: str, relpath: str, start: int, end: int) -> Path:
    """Record that this node reads ``[start, end)`` of ``relpath`` from the origin now."""
    d = claims_dir(cache_dir, key)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{file_id(relpath)}.{start}-{end}"
    path.touch()
    return path


def is_claimed(
    cache_dir: Path, key: str, relpath: str, start: int, end: int, *, now: float
) -> bool:
    """Some fresh claim of this node overlaps ``[start, end)`` of ``relpath`` (blocking)."""
    prefix = file_id(relpath) + "."
    try:
        with os.scandir(claims_dir(cache_dir, key)) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix):
                    continue
                lo, _, hi = entry.name.removeprefix(prefix).partition("-")
                if not (lo.isdigit() and hi.isdigit()):
                    continue
                if int(lo) < end and start < int(hi):
                    with contextlib.suppress(FileNotFoundError):
                        if now - entry.stat().st_mtime <= CLAIM_TTL:
                            return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    return False


#: In a model's claims directory: ``.fetching-<process id>``, one per process of this node
#: fetching the model (the agent's pre-warm and the node plugin's fills share one cache and
#: one node annotation), touched at every renewal of the announcement.
_MARKER_PREFIX: Final = ".fetching-"


def mark_fetching(cache_dir: Path, key: str, process: str) -> None:
    """Record (or renew) that ``process`` of this node fetches ``key``."""
    d = claims_dir(cache_dir, key)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{_MARKER_PREFIX}{process}").touch()


def unmark_fetching(cache_dir: Path, key: str, process: str) -> bool:
    """Drop ``process``'s mark; whether another process of this node still fetches ``key``
    (a mark renewed within :data:`ANNOUNCE_TTL`)."""
    d = claims_dir(cache_dir, key)
    (d / f"{_MARKER_PREFIX}{process}").unlink(missing_ok=True)
    now = time.time()
    try:
        with os.scandir(d) as entries:
            for entry in entries:
                if entry.name.startswith(_MARKER_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if now - entry.stat().st_mtime <= ANNOUNCE_TTL:
                            return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    return False


# ---- the server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wanted:
    """The file as the client's origin lists it."""

    size: int
    sha256: str | None
    version: str | None

    def matches(self, size: Any, sha256: Any, version: Any) -> bool:
        """Same size, and the same sha256 (an unknown one is a mismatch too) or, when the
        origin gives none, not another version."""
        if size != self.size:
            return False
        if self.sha256 is not None:
            return bool(sha256 == self.sha256)
        return not (self.version and version and version != self.version)


def _parse_wanted(query: Mapping[str, str]) -> _Wanted:
    try:
        size = int(query["size"])
    except (KeyError, ValueError):
        raise web.HTTPBadRequest(text="size= (the file's size at the origin) is required") from None
    sha = query.get("sha256") or None
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise web.HTTPBadRequest(text="sha256= must be 64 lowercase hex digits")
    return _Wanted(size, sha, query.get("version") or None)


def _open_complete(md: ModelDir, relpath: str, want: _Wanted) -> int | None:
    """A descriptor of the complete, verified, unchanged file, or None."""
    path = md.data_file(relpath)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        real = os.path.realpath(path)
        meta = read_file_meta(md, relpath)
        ok = (
            stat.S_ISREG(st.st_mode)
            and real.startswith(os.path.realpath(md.data) + os.sep)
            and meta is not None
            and meta.get("stamp") == file_stamp(st)
            and want.matches(st.st_size, meta.get("sha256"), meta.get("version"))
        )
    except OSError:
        ok = False
    if not ok:
        os.close(fd)
        return None
    return fd


def _partial_state(md: ModelDir, relpath: str, want: _Wanted) -> dict[str, Any] | None:
    try:
        state = json.loads(md.partial_state(relpath).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("path") != relpath:
        return None
    if not want.matches(state.get("size"), state.get("sha256"), state.get("version")):
        return None
    if not isinstance(state.get("part_size"), int) or state["part_size"] <= 0:
        return None
    return state


def _parts_done(state: Mapping[str, Any], start: int, end: int) -> bool:
    part = int(state["part_size"])
    done = set(state.get("done") or ())
    return all(i in done for i in range(start // part, (end - 1) // part + 1))


def _read_partial(md: ModelDir, relpath: str, want: _Wanted, start: int, end: int) -> bytes | None:
    """Bytes ``[start, end)`` of a file being fetched, if its state records them as written
    and synced, both before and after they were read from the same file (blocking)."""
    # the file first, then its state: the engine removes a partial's state before it makes
    # a new partial file, so a state read now is this file's or a later one's
    try:
        fd = os.open(md.partial_file(relpath), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        before = _partial_state(md, relpath, want)
        if before is None or not _parts_done(before, start, end):
            return None
        ino = os.fstat(fd).st_ino
        chunks, pos = [], start
        while pos < end:
            chunk = os.pread(fd, min(_CHUNK, end - pos), pos)
            if not chunk:
                return None
            chunks.append(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    # the same file, and still recorded: nothing truncated or replaced it while we read
    after = _partial_state(md, relpath, want)
    try:
        if after is not None and _parts_done(after, start, end):
            same = os.stat(md.partial_file(relpath)).st_ino == ino
        else:
            # finished meanwhile: renamed into data/ (the same inode)
            same = os.stat(md.data_file(relpath)).st_ino == ino
    except OSError:
        return None
    return b"".join(chunks) if same else None


class PeerServer:
    """The agent's peer server over the node cache at ``cache_dir`` (read-only)."""

    def __init__(self, cache_dir: Path, tls: PeerTLS) -> None:
        self.cache = NodeCache(cache_dir)
        self.tls = tls
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.bytes_served = 0

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models/{key}/manifest", self.manifest)
        app.router.add_get("/v1/models/{key}/files/{path:.+}", self.file)
        return app

    async def start(self, host: str, port: int, advertise: str | None = None) -> str:
        """Listen on ``host:port`` (0: any free port); returns ``https://ADDR:PORT`` with
        ``advertise`` (the node's address) or the host."""
        # a stopping agent cuts transfers after a few seconds: the peers read the rest
        # elsewhere, from the byte where it stopped
        self._runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=3.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.tls.server_context())
        await site.start()
        bound = self._runner.addresses[0][1]
        addr = advertise or host
        if ":" in addr:
            addr = f"[{addr}]"
        self.url = f"https://{addr}:{bound}"
        log.info("peer server on %s (listening on %s:%d)", self.url, host, bound)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _model(self, request: web.Request) -> ModelDir:
        key = request.match_info["key"]
        if not _KEY_RE.match(key):
            raise web.HTTPBadRequest(text=f"{key!r} is not a cache key")
        md = self.cache.model_dir(key)
        if md.root.is_symlink() or not md.root.is_dir():
            raise web.HTTPNotFound(text=f"model {key} is not in this node's cache")
        return md

    async def manifest(self, request: web.Request) -> web.Response:
        md = self._model(request)
        complete = await asyncio.to_thread(self.cache.is_complete, md.key)
        manifest = self.cache.read_manifest(md.key) if complete else None
        if manifest is None:
            raise web.HTTPNotFound(text=f"model {md.key} is not complete on this node")
        anonymous = (md.root / ANONYMOUS_MARKER).is_file()
        return web.json_response({**manifest, "anonymous": anonymous})

    async def file(self, request: web.Request) -> web.StreamResponse:
        md = self._model(request)
        try:
            relpath = safe_relpath(request.match_info["path"])
        except UnsafePathError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        want = _parse_wanted(request.query)
        m = _RANGE_RE.match(request.headers.get("Range", ""))
        if not m or int(m.group(1)) > int(m.group(2)) or int(m.group(2)) >= want.size:
            raise web.HTTPRequestRangeNotSatisfiable(
                text="one Range: bytes=START-END inside the file is required"
            )
        start, end = int(m.group(1)), int(m.group(2)) + 1
        try:
            wait = min(MAX_WAIT, max(0.0, float(request.query.get("wait", "0"))))
            grace = min(wait, max(0.0, float(request.query.get("grace", "0"))))
        except ValueError:
            raise web.HTTPBadRequest(text="wait= and grace= are seconds") from None
        started = time.monotonic()
        delay = 0.02
        while True:
            fd = await asyncio.to_thread(_open_complete, md, relpath, want)
            if fd is not None:
                return await self._stream(request, fd, start, end, want.size)
            if end - start <= MAX_PARTIAL_RANGE:
                data = await asyncio.to_thread(_read_partial, md, relpath, want, start, end)
                if data is not None:
                    return await self._send(request, data, start, end, want.size)
            # wait only for what this node reads from the origin now (after a grace to claim
            # it): anything else the client had better read itself
            now = time.monotonic()
            if now - started >= wait:
                break
            if now - started >= grace and not is_claimed(
                self.cache.cache_dir, md.key, relpath, start, end, now=time.time()
            ):
                break
            await asyncio.sleep(min(delay, max(0.0, started + wait - now)))
            delay = min(delay * 2, 0.1)
        if md.partial_state(relpath).exists():
            raise web.HTTPConflict(text=f"{relpath} [{start}, {end}) is not fetched here yet")
        raise web.HTTPNotFound(text=f"{relpath} of this version is not in this node's cache")

    def _headers(self, start: int, end: int, size: int) -> dict[str, str]:
        return {
            "Content-Range": f"bytes {start}-{end - 1}/{size}",
            "Content-Type": "application/octet-stream",
        }

    async def _send(
        self, request: web.Request, data: bytes, start: int, end: int, size: int
    ) -> web.StreamResponse:
        self.bytes_served += len(data)
        return web.Response(status=206, body=data, headers=self._headers(start, end, size))

    async def _stream(
        self, request: web.Request, fd: int, start: int, end: int, size: int
    ) -> web.StreamResponse:
        try:
            resp = web.StreamResponse(status=206, headers=self._headers(start, end, size))
            resp.content_length = end - start
            await resp.prepare(request)
            pos = start
            while pos < end:
                chunk = await asyncio.to_thread(os.pread, fd, min(_CHUNK, end - pos), pos)
                if not chunk:
                    break  # shorter than verified: the client sees a short body and moves on
                await resp.write(chunk)
                pos += len(chunk)
                self.bytes_served += len(chunk)
            return resp
        finally:
            os.close(fd)


# ---- the Kubernetes side ------------------------------------------------------------------------


class NodeDirectory:
    """Lists nodes and patches this node's annotations (blocking client, worker threads)."""

    def __init__(self, api_client: Any, *, request_timeout: float = 10.0) -> None:
        from kubernetes.client import CoreV1Api

        self.api = CoreV1Api(api_client)
        self.timeout = request_timeout

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        last: BaseException | None = None
        for attempt in range(3):
            try:
                return await asyncio.to_thread(fn)
            except (ApiException, HTTPError, OSError, TimeoutError) as exc:
                last = exc
                if isinstance(exc, ApiException) and exc.status not in _TRANSIENT:
                    break
                await asyncio.sleep(0.2 * 2**attempt)
            except Exception as exc:  # noqa: BLE001 - peers are an optimisation: never fail a fetch
                last = exc
                break
        raise PeerUnavailableError(f"{what}: {type(last).__name__}: {last}")

    async def list_nodes(self) -> list[NodeInfo]:
        # resourceVersion=0: served from the API server's cache, not read through to etcd
        result = await self._call(
            "list nodes",
            lambda: self.api.list_node(resource_version="0", _request_timeout=self.timeout),
        )
        nodes = []
        for item in result.items or []:
            meta = item.metadata
            if meta is None or not meta.name:
                continue
            nodes.append(NodeInfo(meta.name, dict(meta.labels or {}), dict(meta.annotations or {})))
        return nodes

    async def read_node(self, name: str) -> NodeInfo:
        item = await self._call(
            "read node", lambda: self.api.read_node(name, _request_timeout=self.timeout)
        )
        meta = item.metadata
        if meta is None:
            return NodeInfo(name)
        return NodeInfo(name, dict(meta.labels or {}), dict(meta.annotations or {}))

    async def annotate(self, name: str, annotations: Mapping[str, str | None]) -> None:
        body = {"metadata": {"annotations": dict(annotations)}}
        await self._call(
            "annotate node",
            lambda: self.api.patch_node(
                name, body, _content_type=MERGE_PATCH, _request_timeout=self.timeout
            ),
        )


class KubePeerNetwork:
    """:class:`~sidecar.sources.peer.PeerNetwork` over the Kubernetes API and HTTPS."""

    def __init__(
        self,
        directory: NodeDirectory,
        node: str,
        tls: PeerTLS,
        cache_dir: Path,
        *,
        refresh: float = 1.0,
        renew: float = ANNOUNCE_TTL / 3,
    ) -> None:
        self.directory = directory
        self._node = node
        self.tls = tls
        self.cache = NodeCache(cache_dir)
        self.refresh = refresh
        self.renew = renew
        self._nodes: list[NodeInfo] = []
        self._nodes_at = -1e9
        self._failed_at = -1e9
        self._listing: asyncio.Task[list[NodeInfo]] | None = None
        self._active: dict[str, int] = {}
        self._renewers: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        #: this process among the node's fetchers (agent and node plugin share the annotation)
        self._process = f"{os.getpid()}-{secrets.token_hex(4)}"

    @property
    def node(self) -> str:
        return self._node

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    ssl=self.tls.client_context(), limit=64, limit_per_host=16
                ),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                auto_decompress=False,
                read_bufsize=1 << 20,
            )
        return self._session

    async def _list(self, fresh: bool = False) -> list[NodeInfo]:
        if not fresh and time.monotonic() - self._nodes_at < self.refresh:
            return self._nodes
        recent = time.monotonic() - self._nodes_at < ANNOUNCE_TTL
        if time.monotonic() - self._failed_at < _LIST_BACKOFF:
            if recent:
                return self._nodes
            # the API failed a moment ago: the ranges go to the origin without waiting
            raise PeerUnavailableError("the node list failed less than 5 s ago")
        if self._listing is None or self._listing.done():
            self._listing = asyncio.create_task(self.directory.list_nodes())
        try:
            nodes = await asyncio.shield(self._listing)
        except PeerUnavailableError:
            self._failed_at = time.monotonic()
            if recent:
                return self._nodes  # a recent list beats none while the API is busy
            raise
        self._nodes, self._nodes_at = nodes, time.monotonic()
        return nodes

    async def holders(self, key: str, *, fresh: bool = False) -> list[Peer]:
        nodes = await self._list(fresh)
        return [p for p in holders_of(nodes, key, time.time()) if p.node != self._node]

    async def _announce(self, key: str, state: str) -> None:
        await self.directory.annotate(
            self._node, {fetching_annotation(key): announcement(state, time.time())}
        )

    async def announce(self, key: str) -> None:
        self._active[key] = self._active.get(key, 0) + 1
        if self._active[key] > 1:
            return
        try:
            await asyncio.to_thread(mark_fetching, self.cache.cache_dir, key, self._process)
        except OSError as exc:
            log.warning("%s: cannot mark the fetch in the node cache: %s", key, exc)
        await self._announce(key, FETCHING)
        self._nodes_at = -1e9  # read the others again: who announced before us
        self._renewers[key] = asyncio.create_task(self._keep(key))

    async def _keep(self, key: str) -> None:
        while True:
            await asyncio.sleep(self.renew)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(mark_fetching, self.cache.cache_dir, key, self._process)
            try:
                await self._announce(key, FETCHING)
            except PeerUnavailableError as exc:
                log.warning("%s: cannot renew the fetch announcement: %s", key, exc)

    def claim(self, key: str, path: str, start: int, end: int) -> Callable[[], None]:
        try:
            claim = write_claim(self.cache.cache_dir, key, path, start, end)
        except OSError as exc:
            log.warning("%s: cannot record a claim: %s", key, exc)
            return lambda: None
        return lambda: claim.unlink(missing_ok=True)

    async def finish(self, key: str) -> None:
        count = self._active.get(key, 0) - 1
        if count > 0:
            self._active[key] = count
            return
        self._active.pop(key, None)
        task = self._renewers.pop(key, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            others = await asyncio.to_thread(
                unmark_fetching, self.cache.cache_dir, key, self._process
            )
        except OSError:
            others = False
        if not others:  # the other process's claims stay while it fetches
            shutil.rmtree(claims_dir(self.cache.cache_dir, key), ignore_errors=True)
        if await asyncio.to_thread(self.cache.is_complete, key):
            await self._announce(key, COMPLETE)
        elif not others:  # else the other process of this node renews its announcement
            await self.directory.annotate(self._node, {fetching_annotation(key): None})

    async def manifest(self, peer: Peer, key: str) -> dict[str, Any] | None:
        url = URL(f"{peer.url}/v1/models/{quote(key)}/manifest", encoded=True)
        try:
            async with asyncio.timeout(10):
                async with self.session.get(url) as resp:
                    if resp.status == 404:
                        return None
                    if resp.status != 200:
                        raise PeerUnavailableError(f"{peer.node}: HTTP {resp.status}")
                    data = await resp.json()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise PeerUnavailableError(f"{peer.node}: {type(exc).__name__}: {exc}") from None
        return data if isinstance(data, dict) else None

    async def read(
        self,
        peer: Peer,
        key: str,
        f: RemoteFile,
        start: int,
        end: int,
        *,
        version: str | None,
        wait: float,
        grace: float,
        stall: float,
    ) -> AsyncIterator[bytes]:
        query = {"size": str(f.size), "wait": f"{wait:g}", "grace": f"{grace:g}"}
        if f.sha256:
            query["sha256"] = f.sha256
        if version:
            query["version"] = version
        url = URL(
            f"{peer.url}/v1/models/{quote(key)}/files/{quote(f.path, safe='/')}", encoded=True
        ).with_query(query)
        want, got = end - start, 0
        try:
            async with asyncio.timeout(wait + stall):  # the answer comes once the peer has it
                resp = await self.session.get(url, headers={"Range": f"bytes={start}-{end - 1}"})
            async with resp:
                if resp.status != 206:
                    raise PeerUnavailableError(f"{peer.node}: HTTP {resp.status}")
                m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
                    raise PeerUnavailableError(
                        f"{peer.node}: asked for {start}-{end - 1}, got "
                        f"{resp.headers.get('Content-Range')!r}"
                    )
                chunks = aiter(resp.content.iter_chunks())
                while got < want:
                    try:
                        async with asyncio.timeout(stall):
                            raw, _ = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    chunk = raw[: want - got] if got + len(raw) > want else raw
                    got += len(chunk)
                    yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailableError(
                f"{peer.node}: after {got} of {want} bytes: {type(exc).__name__}: {exc}"
            ) from None
        if got != want:
            raise PeerUnavailableError(f"{peer.node}: short body, {got} of {want} bytes")

    async def aclose(self) -> None:
        for key in list(self._renewers):
            self._active[key] = 1
            with contextlib.suppress(PeerUnavailableError):
                await self.finish(key)
        if self._session is not None:
            await self._session.close()


# ---- the agent's service -----------------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
        if not sep or not host or not 0 <= number <= 65535:
            raise ValueError
        ipaddress.ip_address(host)
    except ValueError:
        raise PeerSetupError(
            f"--peer-listen {value!r}: expected IP:PORT (e.g. 0.0.0.0:9443 or [::]:9443)"
        ) from None
    return host, number


@dataclass
class PeerService:
    """The peer server (agent only) and the network the node's fetches use."""

    network: KubePeerNetwork
    server: PeerServer | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop()
        await self.network.aclose()


async def _tidy(directory: NodeDirectory, node: str, every: float) -> None:
    """Remove this node's announcements that no longer count, now and then."""
    while True:
        try:
            info = await directory.read_node(node)
            patch = stale_announcements(info, time.time())
            if patch:
                await directory.annotate(node, patch)
        except PeerUnavailableError as exc:
            log.warning("peer announcements of node %s: %s", node, exc)
        await asyncio.sleep(every)


async def start_peers(
    api_client: Any,
    *,
    node: str,
    cache_dir: Path,
    tls: PeerTLS,
    listen: str | None,
    advertise: str | None = None,
    tidy_every: float = 60.0,
) -> PeerService:
    """The peer network of this node; with ``listen`` (the agent) also its server, whose
    address goes into the node annotation ``modelcache.io/peer``."""
    directory = NodeDirectory(api_client)
    service = PeerService(KubePeerNetwork(directory, node, tls, cache_dir))
    if listen is None:
        return service
    host, port = parse_listen(listen)
    if advertise is None and ipaddress.ip_address(host).is_unspecified:
        raise PeerSetupError(
            f"--peer-listen {listen} listens on every address: --peer-advertise must name "
            "the address other nodes reach this one at (the pod's or node's IP)"
        )
    service.server = PeerServer(cache_dir, tls)
    try:
        url = await service.server.start(host, port, advertise)
        await directory.annotate(node, {PEER_ANNOTATION: url})
    except (OSError, PeerUnavailableError) as exc:
        await service.aclose()
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            raise PeerSetupError(f"--peer-listen {listen}: address in use") from None
        raise PeerSetupError(f"peer server: {exc}") from None
    service._tasks.append(asyncio.create_task(_tidy(directory, node, tidy_every)))
    return service


__all__ = [
    "ANNOUNCE_TTL",
    "FETCHING_PREFIX",
    "PEER_ANNOTATION",
    "KubePeerNetwork",
    "NodeDirectory",
    "NodeInfo",
    "PeerServer",
    "PeerService",
    "PeerSetupError",
    "PeerTLS",
    "holders_of",
    "parse_announcement",
    "stale_announcements",
    "start_peers",
]
