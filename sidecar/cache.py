"""The node cache: one directory per model, shared by every pod (and process) on the node.

Layout and its invariants are documented in ``sidecar.layout``. This module is the only
writer of ``data/``, ``.partial/``, ``.locks/``, ``source.json`` and ``manifest.json``:

* A file appears under ``data/`` only by ``rename`` after its size (always) and sha256
  (when the source gives one) were verified and its bytes fsynced, so a reader (the FUSE
  mount, an app through the symlink view, the agent) never sees a half-written file.
* Downloads are single-flight per file across processes: ``fcntl.flock`` on
  ``.locks/<id>.lock``. A waiter polls the lock without blocking the event loop and, once
  it gets it, finds the file complete and returns; if the holder died, the waiter resumes.
* Resumable after ``kill -9``: the download goes into ``.partial/<id>.part`` (preallocated,
  so a full disk fails up front) in fixed-size parts fetched in parallel with ranged reads;
  ``.partial/<id>.json`` lists the parts already written (each fdatasynced first) plus the
  size, sha256 and source version they belong to. A rerun fetches only the missing parts;
  state from another version of the file is discarded.
* Disk I/O runs in threads (``asyncio.to_thread``); sha256 is computed in file order while
  later parts are still downloading, so verification adds little after the last byte.
* A new revision of an ``hf://`` model downloads only the files that changed: a file whose
  listed sha256 matches a complete, unchanged file of another revision of the same repository
  in the cache is copied from it (``copy_file_range``: a reflink where the filesystem can),
  hashed again, and renamed into place like a download. A copy, not a hard link: the two
  files keep their own inodes, so one model's stamp never changes with the other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.layout import PIN_TTL, ModelDir, models_root
from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_uri
from sidecar.sources import (
    RefetchableSource,
    RemoteFile,
    Source,
    SourceError,
    SourceUnavailableError,
)

log = logging.getLogger(__name__)

PART_SIZE = 16 << 20
WRITE_BUFFER = 4 << 20
RETRIES = 5
BACKOFF = 0.5
#: Fetches of a file again after it failed its sha256 check with bytes from elsewhere than
#: the origin (``RefetchableSource``): each one excludes the places that sent bad bytes.
_REFETCHES = 3
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class CacheError(Exception):
    """The node cache cannot take the file (full disk, corrupt download, ...); one clear line."""


class CacheFullError(CacheError):
    """No space left in the node cache (ENOSPC, EDQUOT)."""


class ChecksumError(CacheError):
    """A downloaded file's sha256 differs from the source's; the download was discarded."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any, *, durable: bool = True) -> None:
    """Write ``obj`` to ``path`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pwritev_all(fd: int, chunks: list[bytes], offset: int) -> None:
    """Write the chunks back to back at ``offset`` with no copy into one buffer first."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.pwritev(fd, views[:1024], offset)  # IOV_MAX
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _copy_range(open_local: Callable[[str], int], path: str, fd: int, start: int, end: int) -> None:
    """Copy ``[start, end)`` of a local source file into ``fd`` at the same offset, in the
    kernel; the source opens (and checks) its own file."""
    sfd = open_local(path)
    pos = start
    try:
        try:
            while pos < end:
                n = os.copy_file_range(sfd, fd, end - pos, pos, pos)
                if n == 0:
                    raise SourceError(f"{path} is shorter than listed ({pos} < {end} bytes)")
                pos += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            while pos < end:
                chunk = os.pread(sfd, min(WRITE_BUFFER, end - pos), pos)
                if not chunk:
                    raise SourceError(
                        f"{path} is shorter than listed ({pos} < {end} bytes)"
                    ) from None
                _pwrite_all(fd, chunk, pos)
                pos += len(chunk)
    finally:
        os.close(sfd)


def _hash_range(fd: int, h: Any, start: int, end: int) -> None:
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(WRITE_BUFFER, end - pos), pos)
        if not chunk:
            raise OSError(errno.EIO, "partial file shorter than expected")
        h.update(chunk)
        pos += len(chunk)


def safe_pin_name(holder: str) -> str:
    """A pin file name for ``holder``: letters, digits, ``.``, ``_``, ``-`` only."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", holder)[:253].lstrip(".")
    return name or "unnamed"


def pin_holder() -> str:
    """Who this process pins for: ``MODELCACHE_POD`` (e.g. the pod's uid from the Downward
    API) or else the host name, which is the pod's name in a pod."""
    return safe_pin_name(os.environ.get("MODELCACHE_POD") or socket.gethostname())


#: States of a file in ``data/`` (``NodeCache._file_state``).
CURRENT = "current"
STALE = "stale"
UNVERIFIED = "unverified"


def file_stamp(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes may have: inode, size, mtime and ctime (ctime
    cannot be set back from user space, so restoring the mtime does not hide a write)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def read_file_meta(md: ModelDir, relpath: str) -> dict[str, Any] | None:
    """``.locks/<id>.meta`` of a complete file, or None (absent or unreadable)."""
    try:
        meta = json.loads(md.file_meta(relpath).read_bytes())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _version_of(source: Source, path: str) -> str | None:
    version_of = getattr(source, "version", None)
    return version_of(path) if callable(version_of) else None


def _is_space_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS


class NodeCache:
    """The node-local model cache at ``cache_dir`` (see the module docstring)."""

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        part_size: int = PART_SIZE,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
    ) -> None:
        if part_size < 1 << 16:
            raise ValueError(f"part_size {part_size} is too small (minimum 64 KiB)")
        self.cache_dir = Path(cache_dir)
        self.part_size = part_size
        self.retries = retries
        self.backoff = backoff
        self._inflight: dict[tuple[str, str], asyncio.Future[Path]] = {}

    # ---- paths and metadata -------------------------------------------------------------

    @staticmethod
    def _key(model: NamedModel | str) -> str:
        return model if isinstance(model, str) else model.source.cache_key

    def model_dir(self, model: NamedModel | str) -> ModelDir:
        return ModelDir(self.cache_dir, self._key(model))

    def prepare_model(self, model: NamedModel) -> ModelDir:
        """Create the model's directories and its ``source.json`` (idempotent)."""
        md = self.model_dir(model)
        try:
            for d in (md.data, md.partial_dir, md.locks_dir):
                d.mkdir(parents=True, exist_ok=True)
            if not md.source_file.exists():
                atomic_write_json(md.source_file, {"uri": model.source.uri, "key": md.key})
        except OSError as exc:
            raise CacheError(f"cannot create {md.root}: {exc.strerror or exc}") from None
        return md

    def read_manifest(self, model: NamedModel | str) -> dict[str, Any] | None:
        """``manifest.json`` of a complete model, or None (absent or unreadable)."""
        try:
            data = json.loads(self.model_dir(model).manifest.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            return None
        return data

    def is_complete(self, model: NamedModel | str) -> bool:
        """A manifest exists, names at least one file, and every file it names is in
        ``data/`` with its size (a model with no files is never complete)."""
        manifest = self.read_manifest(model)
        if manifest is None or not manifest["files"]:
            return False
        md = self.model_dir(model)
        try:
            return all(
                md.data_file(f["path"]).stat().st_size == f["size"] for f in manifest["files"]
            )
        except (OSError, KeyError, TypeError, ValueError):
            return False

    def is_file_current(
        self, model: NamedModel | str, source: Source | None, f: RemoteFile
    ) -> bool:
        """``f`` is in ``data/`` as the source lists it and unchanged since it was verified
        (a stat and a small read; no hashing). Otherwise ``ensure_file`` verifies or
        fetches it. Without ``source`` the source's version of the file is not compared
        (its size and sha256 still are)."""
        md = self.model_dir(model)
        version = _version_of(source, f.path) if source is not None else None
        return self._file_state(md, f, version) == CURRENT

    def is_file_complete(self, model: NamedModel | str, f: RemoteFile) -> bool:
        try:
            return self.model_dir(model).data_file(f.path).stat().st_size == f.size
        except OSError:
            return False

    @staticmethod
    def _meta_path(md: ModelDir, relpath: str) -> Path:
        # what the file in data/ was downloaded as: lets a later listing spot a file that
        # changed at the source but kept its size (same-size edits, a moved hub branch)
        return md.file_meta(relpath)

    def _file_state(self, md: ModelDir, f: RemoteFile, version: str | None) -> str:
        """``CURRENT``, ``STALE`` (missing or changed at the source: fetch it) or
        ``UNVERIFIED`` (changed on disk since it was verified: verify it before use)."""
        try:
            st = md.data_file(f.path).stat()
        except OSError:
            return STALE
        if st.st_size != f.size:
            return STALE
        meta = read_file_meta(md, f.path)
        if meta is None:
            return UNVERIFIED  # complete, and nothing recorded to compare with
        if f.sha256 and meta.get("sha256"):
            if meta["sha256"] != f.sha256:
                return STALE
        elif version and meta.get("version") and meta["version"] != version:
            return STALE
        return CURRENT if meta.get("stamp") == file_stamp(st) else UNVERIFIED

    def _reverify(self, md: ModelDir, f: RemoteFile, identity: dict[str, Any]) -> bool:
        """Hash a file whose stamp changed (blocking). True: intact, its stamp recorded
        again. False: it was moved to ``.quarantine/`` and must be fetched again.

        The expected sha256 is the source's (now or when it was fetched). A file fetched
        without one cannot be proven intact once it changed on disk, so it is fetched again;
        a file with no stamp at all (cached before stamps were recorded) is adopted as it
        is when there is nothing to compare with.
        """
        path = md.data_file(f.path)
        meta = read_file_meta(md, f.path)
        expected = f.sha256 or (meta or {}).get("sha256")
        had_stamp = meta is not None and meta.get("stamp") is not None
        digest = None
        if expected:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                before = os.fstat(fd)
                h = hashlib.sha256()
                _hash_range(fd, h, 0, before.st_size)
                digest = h.hexdigest()
                # written to while we hashed: what we hashed proves nothing
                intact = digest == expected and file_stamp(os.fstat(fd)) == file_stamp(before)
            finally:
                os.close(fd)
        else:
            before = os.stat(path)
            intact = not had_stamp
        if intact:
            atomic_write_json(
                md.file_meta(f.path),
                {**(meta or identity), "sha256": expected, "stamp": file_stamp(before)},
                durable=False,
            )
            return True
        md.quarantine_dir.mkdir(exist_ok=True)
        os.replace(path, md.quarantine_file(f.path))
        with contextlib.suppress(FileNotFoundError):
            md.file_meta(f.path).unlink()
        if expected:
            why = f"sha256 {digest}, expected {expected}"
        else:
            why = "changed on disk and the source gives no sha256 to prove it intact"
        log.warning(
            "%s: cached copy failed verification (%s); moved to %s, fetching it again",
            f.path,
            why,
            md.quarantine_file(f.path),
        )
        return False

    def write_manifest(self, model: NamedModel, files: list[RemoteFile]) -> None:
        """Atomically mark the model complete; every file must already be in ``data/``."""
        md = self.model_dir(model)
        if not files:
            raise CacheError(f"{model.name}: cannot write a manifest that lists no files")
        missing = [f.path for f in files if not self.is_file_complete(model, f)]
        if missing:
            raise CacheError(
                f"{model.name}: cannot write the manifest, {len(missing)} file(s) are not "
                f"complete: {', '.join(missing[:5])}"
            )
        manifest = {
            "uri": model.source.uri,
            "key": md.key,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
            "total_bytes": sum(f.size for f in files),
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            atomic_write_json(md.manifest, manifest)
        except OSError as exc:
            raise CacheError(f"{model.name}: cannot write {md.manifest}: {exc}") from None

    @contextlib.contextmanager
    def hold(
        self, model: NamedModel | str, *, exclusive: bool = False, blocking: bool = True
    ) -> Iterator[bool]:
        """``flock`` the model's ``.model.lock``: shared while serving or filling it,
        exclusive to evict it. Yields False when ``blocking=False`` and the lock is busy,
        or when an exclusive hold is asked for a model that is not in the cache."""
        md = self.model_dir(model)
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if not blocking:
            op |= fcntl.LOCK_NB
        while True:
            if not md.root.is_dir():
                if exclusive:
                    yield False
                    return
                md.root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(md.model_lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the directory was evicted between the check and the open
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            # the agent may have moved the directory to trash while we waited for the lock:
            # then we hold a lock on the old inode and must take the new one instead
            try:
                same = os.stat(md.model_lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield True
        finally:
            os.close(fd)

    def discard_partials(self, model: NamedModel | str) -> int:
        """Remove the model's partial downloads that nobody is fetching now; bytes freed.

        For a full disk: the other files of a warm-up that failed with ENOSPC were cancelled
        with their preallocated partials still in place, holding the disk full for every
        other pod. A partial whose file lock is held (a fetch in this or another process)
        is left alone.
        """
        md = self.model_dir(model)
        freed = 0
        try:
            parts = sorted(md.partial_dir.glob("*.part"))
        except OSError:
            return 0
        for part in parts:
            fid = part.name.removesuffix(".part")
            try:
                fd = os.open(md.locks_dir / f"{fid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                with contextlib.suppress(FileNotFoundError):
                    freed += part.stat().st_blocks * 512
                    part.unlink()
                with contextlib.suppress(FileNotFoundError):
                    (md.partial_dir / f"{fid}.json").unlink()
            finally:
                os.close(fd)
        if freed:
            log.warning("%s: removed %d bytes of partial downloads (disk full)", md.key, freed)
        return freed

    def pin(self, model: NamedModel | str, holder: str) -> None:
        """Pin the model for ``holder`` (a pod) now: the agent does not evict it while the
        pin is younger than ``layout.PIN_TTL`` (see "Pins" in ``sidecar.layout``)."""
        md = self.model_dir(model)
        path = md.pin_file(safe_pin_name(holder))
        try:
            md.pins_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.close(fd)
            os.utime(path)
        except OSError as exc:
            raise CacheError(f"cannot pin {md.key} at {path}: {exc.strerror or exc}") from None

    def live_pins(
        self, model: NamedModel | str, ttl: float = PIN_TTL, now: float | None = None
    ) -> list[str]:
        """Holders whose pin on the model was renewed within ``ttl`` seconds."""
        now = time.time() if now is None else now
        live = []
        try:
            with os.scandir(self.model_dir(model).pins_dir) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        if now - entry.stat(follow_symlinks=False).st_mtime < ttl:
                            live.append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(live)

    def prune_pins(self, model: NamedModel | str, ttl: float = PIN_TTL) -> int:
        """Remove the pins that expired (their pods are gone); how many were removed."""
        now = time.time()
        removed = 0
        try:
            with os.scandir(self.model_dir(model).pins_dir) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        if now - entry.stat(follow_symlinks=False).st_mtime >= ttl:
                            os.unlink(entry.path)
                            removed += 1
        except (FileNotFoundError, NotADirectoryError):
            return 0
        return removed

    def touch(self, model: NamedModel | str) -> None:
        """Mark the model used now (its ``.last-used`` mtime orders LRU eviction)."""
        path = self.model_dir(model).last_used
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.close(fd)
            os.utime(path)

    # ---- downloads ----------------------------------------------------------------------

    async def ensure_file(
        self,
        model: NamedModel,
        source: Source,
        f: RemoteFile,
        *,
        parallel: int = 8,
        on_bytes: Callable[[int], None] | None = None,
        limiter: asyncio.Semaphore | None = None,
    ) -> Path:
        """Make ``f`` complete in ``data/`` and return its path (see the module docstring).

        ``on_bytes`` is called with the byte count of every chunk this call writes.
        ``limiter`` (optional) bounds concurrent ranged reads across several files.
        """
        md = self.prepare_model(model)
        dest = md.data_file(f.path)
        if self._file_state(md, f, _version_of(source, f.path)) == CURRENT:
            return dest
        key = (str(md.root), f.path)
        while (running := self._inflight.get(key)) is not None:
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we were cancelled ourselves
                # the call doing the fetch was cancelled (e.g. its timeout): take over
        fut: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            job = _Job(
                md, source, f, dest, on_bytes, limiter or asyncio.Semaphore(max(1, parallel))
            )
            job.repo = _hub_repo(model)
            path = await self._ensure_locked(job)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        else:
            fut.set_result(path)
            return path
        finally:
            del self._inflight[key]

    async def _ensure_locked(self, job: _Job) -> Path:
        lock_fd = os.open(job.md.file_lock(job.f.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            delay = 0.01
            while True:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # another process is fetching this file: wait for it without a thread
                    # stuck in flock (which could not be cancelled on timeout)
                    if delay == 0.01:
                        log.info("%s: another process on this node is fetching it", job.f.path)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.2)
            version = _version_of(job.source, job.f.path)
            state = self._file_state(job.md, job.f, version)
            if state == UNVERIFIED:
                identity = {"path": job.f.path, "size": job.f.size, "sha256": job.f.sha256}
                try:
                    ok = await asyncio.to_thread(
                        self._reverify, job.md, job.f, {**identity, "version": version}
                    )
                except FileNotFoundError:
                    ok = False  # gone meanwhile: fetch it
                except OSError as exc:
                    raise CacheError(
                        f"node cache {self.cache_dir}: cannot verify {job.f.path}: "
                        f"{exc.strerror or exc}"
                    ) from None
                state = CURRENT if ok else STALE
            if state == STALE and not await self._reuse(job, version):
                # stale or missing: fetch it and rename over any old copy (readers that
                # have the old one open keep reading it; new opens get the new one)
                await self._download_verified(job)
            return job.dest
        finally:
            os.close(lock_fd)

    # ---- reuse across revisions ----------------------------------------------------------

    def find_same_content(self, md: ModelDir, repo: str, f: RemoteFile) -> Path | None:
        """A complete file with ``f``'s sha256 in another revision of hub repo ``repo``:
        verified when written and unchanged since (its stamp), else None."""
        if not f.sha256:
            return None
        try:
            roots = sorted(p for p in models_root(self.cache_dir).iterdir() if p != md.root)
        except OSError:
            return None
        for root in roots:
            other = ModelDir(self.cache_dir, root.name)
            try:
                uri = json.loads(other.source_file.read_bytes()).get("uri", "")
                if _hub_repo_of(str(uri)) != repo:
                    continue
                metas = sorted(other.locks_dir.glob("*.meta"))
            except (OSError, ValueError, AttributeError):
                continue
            # the same path first (the usual case), then any path (a renamed file)
            same = other.file_meta(f.path)
            for meta_path in sorted(metas, key=lambda p: p != same):
                try:
                    meta = json.loads(meta_path.read_bytes())
                    if meta.get("sha256") != f.sha256 or meta.get("size") != f.size:
                        continue
                    path = other.data_file(str(meta["path"]))
                    if file_stamp(path.stat()) == meta.get("stamp"):
                        return path
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    continue
        return None

    async def _reuse(self, job: _Job, version: str | None) -> bool:
        """Fill ``job`` from the same bytes of another revision (see the module docstring);
        False when there is none or the copy does not verify (then it is downloaded)."""
        if job.repo is None:
            return False
        donor = await asyncio.to_thread(self.find_same_content, job.md, job.repo, job.f)
        if donor is None:
            return False
        part_path = job.md.partial_file(job.f.path)
        identity = {"path": job.f.path, "size": job.f.size, "sha256": job.f.sha256}
        try:
            ok = await asyncio.to_thread(self._copy_verified, donor, part_path, job.f)
            if ok:
                job.dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(part_path, job.dest)
                _fsync_dir(job.dest.parent)
                stamp = file_stamp(os.stat(job.dest))
                atomic_write_json(
                    self._meta_path(job.md, job.f.path),
                    {**identity, "version": version, "stamp": stamp, "copied_from": str(donor)},
                    durable=False,
                )
                with contextlib.suppress(FileNotFoundError):
                    job.md.partial_state(job.f.path).unlink()  # an older partial's resume state
        except (OSError, SourceError) as exc:
            with contextlib.suppress(OSError):
                part_path.unlink()
            if isinstance(exc, OSError) and _is_space_error(exc):
                raise self._disk_error(job.f, exc) from None
            log.warning(
                "%s: could not copy it from %s (%s); downloading it", job.f.path, donor, exc
            )
            return False
        if ok:
            log.info("%s: same content as %s, copied instead of downloaded", job.f.path, donor)
        return ok

    @staticmethod
    def _copy_verified(donor: Path, part_path: Path, f: RemoteFile) -> bool:
        """Copy ``donor`` to ``part_path`` and check size and sha256 of the copy (blocking).
        A copy that does not verify is removed."""
        src = os.open(donor, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(part_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                _copy_range(lambda _: os.dup(src), f.path, dst, 0, f.size)
                h = hashlib.sha256()
                _hash_range(dst, h, 0, f.size)
                ok = h.hexdigest() == f.sha256 and os.fstat(dst).st_size == f.size
                if ok:
                    os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        if not ok:
            log.warning("%s: the copy from %s does not match its sha256", f.path, donor)
            with contextlib.suppress(OSError):
                part_path.unlink()
        return ok

    async def _download_verified(self, job: _Job) -> None:
        """``_download``, again (a few times at most) when the file failed its sha256 check
        with bytes a source took from elsewhere than the origin (peers) and it can read
        them from another place now."""
        for attempt in range(_REFETCHES + 1):
            try:
                await self._download(job)
                return
            except ChecksumError as exc:
                source = job.source
                if attempt == _REFETCHES or not isinstance(source, RefetchableSource):
                    raise
                if not source.reject_file(job.f.path):
                    raise
                log.warning("%s; fetching it again from elsewhere", exc)
                job.done = set()  # the discarded download's parts are gone with it

    @staticmethod
    def _load_state(path: Path) -> dict[str, Any] | None:
        try:
            state = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    async def _download(self, job: _Job) -> None:
        f, md = job.f, job.md
        part_path = md.partial_file(f.path)
        state_path = md.partial_state(f.path)
        version = _version_of(job.source, f.path)
        n_parts = -(-f.size // self.part_size)
        identity = {"path": f.path, "size": f.size, "sha256": f.sha256, "version": version}
        state = self._load_state(state_path)
        if (
            state is not None
            and {k: state.get(k) for k in identity} == identity
            and state.get("part_size") == self.part_size
            and part_path.exists()
            and part_path.stat().st_size == f.size
        ):
            job.done = {int(i) for i in state.get("done", []) if 0 <= int(i) < n_parts}
        else:
            for p in (part_path, state_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        if job.done:
            log.info("%s: resuming, %d of %d parts already here", f.path, len(job.done), n_parts)

        def cleanup() -> None:
            for p in (part_path, state_path):
                with contextlib.suppress(OSError):
                    p.unlink()

        def save_state() -> None:
            atomic_write_json(
                state_path,
                {**identity, "part_size": self.part_size, "done": sorted(job.done)},
                durable=False,
            )

        job.save_state = save_state
        try:
            job.fd = os.open(part_path, os.O_RDWR | os.O_CREAT, 0o644)
            if not job.done:
                await asyncio.to_thread(self._allocate, job.fd, f.size)
                save_state()
            await self._fetch_parts(job, n_parts)
            await asyncio.to_thread(os.fsync, job.fd)
        except (OSError, CacheError) as exc:
            # a full disk or a corrupt download: remove it so nothing half-written stays;
            # other I/O errors leave the partial resumable
            if job.fd >= 0:
                os.close(job.fd)
                job.fd = -1
            if isinstance(exc, CacheError) or _is_space_error(exc):
                cleanup()
            if isinstance(exc, OSError):
                raise self._disk_error(f, exc) from None
            raise
        finally:
            if job.fd >= 0:
                os.close(job.fd)
                job.fd = -1
        try:
            job.dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(part_path, job.dest)
            _fsync_dir(job.dest.parent)
            # the stamp after the rename (which changes ctime): any later write, truncate,
            # utime or replacement of the file changes it, and the file is verified again
            stamp = file_stamp(os.stat(job.dest))
            atomic_write_json(
                self._meta_path(md, f.path), {**identity, "stamp": stamp}, durable=False
            )
        except OSError as exc:
            raise self._disk_error(f, exc) from None
        with contextlib.suppress(FileNotFoundError):
            state_path.unlink()

    def _disk_error(self, f: RemoteFile, exc: OSError) -> CacheError:
        if _is_space_error(exc):
            return CacheFullError(
                f"no space left in the node cache {self.cache_dir} for {f.path} "
                f"({f.size} bytes); the partial download was removed"
            )
        return CacheError(f"node cache {self.cache_dir}: {f.path}: {exc.strerror or exc}")

    @staticmethod
    def _allocate(fd: int, size: int) -> None:
        os.ftruncate(fd, 0)
        if size == 0:
            return
        try:
            # reserve the blocks now: a full disk fails here, not after minutes of download
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(fd, size)

    async def _fetch_parts(self, job: _Job, n_parts: int) -> None:
        f, part = job.f, self.part_size
        ready = [asyncio.Event() for _ in range(n_parts)]
        for i in job.done:
            ready[i].set()
        open_local = getattr(job.source, "open_local", None)

        written: set[int] = set()
        wake = asyncio.Event()

        async def fetch(i: int) -> None:
            start, end = i * part, min((i + 1) * part, f.size)
            async with job.sem:
                if callable(open_local):
                    await asyncio.to_thread(_copy_range, open_local, f.path, job.fd, start, end)
                    job.add_bytes(end - start)
                else:
                    await self._fetch_range(job, start, end)
            written.add(i)
            wake.set()
            ready[i].set()  # hashing reads the page cache: it need not wait for the disk

        async def checkpoint() -> None:
            # data first, then the record that it is there: a crash only ever costs a
            # re-fetch of parts not recorded yet, never a hole marked as done. One fdatasync
            # covers every part written meanwhile, and it runs beside the downloads instead
            # of holding a download slot while the disk catches up.
            while len(job.done) < n_parts:
                await wake.wait()
                wake.clear()
                batch = written - job.done
                if batch:
                    await asyncio.to_thread(os.fdatasync, job.fd)
                    job.done |= batch
                    await asyncio.to_thread(job.save_state)

        async def verify() -> None:
            h = hashlib.sha256()
            for i in range(n_parts):
                await ready[i].wait()
                await asyncio.to_thread(
                    _hash_range, job.fd, h, i * part, min((i + 1) * part, f.size)
                )
            if h.hexdigest() != f.sha256:
                raise ChecksumError(
                    f"{f.path}: sha256 mismatch (source says {f.sha256}, downloaded "
                    f"{h.hexdigest()}); the download was discarded"
                )

        tasks = [asyncio.create_task(fetch(i)) for i in range(n_parts) if i not in job.done]
        tasks.append(asyncio.create_task(checkpoint()))
        if f.sha256:
            tasks.append(asyncio.create_task(verify()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_range(self, job: _Job, start: int, end: int) -> None:
        """One part with bounded retries; a retry resumes where the last attempt stopped."""
        f = job.f
        pos = start
        attempt = 0
        while True:
            buf = _Buffer()
            try:
                async for chunk in job.source.read_range(f.path, pos, end):
                    buf.add(chunk)
                    if buf.size >= WRITE_BUFFER:
                        pos = await job.write(buf, pos)
                if buf.size:
                    pos = await job.write(buf, pos)
                if pos != end:
                    raise SourceUnavailableError(
                        f"{f.path}: source ended at byte {pos}, expected {end}"
                    )
                return
            except SourceUnavailableError as exc:
                # keep what arrived before the failure: the retry asks only for the rest
                if buf.size:
                    pos = await job.write(buf, pos)
                attempt += 1
                if attempt > self.retries:
                    raise SourceUnavailableError(
                        f"giving up on {f.path} after {self.retries} retries: {exc}"
                    ) from None
                delay = self.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
                log.warning("%s (retry %d/%d in %.1fs)", exc, attempt, self.retries, delay)
                await asyncio.sleep(delay)


def _hub_repo_of(uri: str) -> str | None:
    try:
        source = parse_model_uri(uri)
    except ModelSourceError:
        return None
    return source.location if source.scheme == "hf" else None


def _hub_repo(model: NamedModel) -> str | None:
    """The hub repository of an ``hf://`` model (every revision of it shares files)."""
    return model.source.location if model.source.scheme == "hf" else None


@dataclass
class _Job:
    """One file download in progress."""

    md: ModelDir
    source: Source
    f: RemoteFile
    dest: Path
    on_bytes: Callable[[int], None] | None
    sem: asyncio.Semaphore
    fd: int = -1
    done: set[int] = field(default_factory=set)
    save_state: Callable[[], None] = lambda: None
    #: the hub repository of an hf:// model: files of its other revisions may be reused
    repo: str | None = None

    def add_bytes(self, n: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes(n)

    async def write(self, buf: _Buffer, pos: int) -> int:
        """Write and empty ``buf`` at ``pos``; return the next position."""
        chunks, size = buf.take()
        await asyncio.to_thread(_pwritev_all, self.fd, chunks, pos)
        self.add_bytes(size)
        return pos + size


class _Buffer:
    """Received chunks waiting for one ``pwritev`` (no concatenation: every copy of every
    byte costs CPU that a 2-core node would rather spend receiving)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)

    def take(self) -> tuple[list[bytes], int]:
        chunks, size = self.chunks, self.size
        self.chunks, self.size = [], 0
        return chunks, size
