"""The read-only FUSE filesystem: ``<mountpoint>/<NAME>/<path in the model>``.

The only module that imports the FUSE binding (``mfusepy``, ctypes over libfuse3). It knows
nothing about sources, the node cache or asyncio: it serves a fixed namespace (the file list
of each model, taken once at start) and asks a :class:`FileProvider` for the complete data
file of a path when an app needs its bytes. The provider blocks until the file is complete
(fetching it if needed), which is how "opening a file that is not complete yet fetches it"
works without ever exposing a partial file.

Two data paths (see docs/design.md, "Measured facts that shape the design"):

``link`` mode
    Every file (or, for the node plugin's hand-over, every file complete when the mount
    started) is a symlink to ``<link-root>/<cache-key>/<path>``, a read-only view of the
    node cache that app containers also mount. ``readlink`` returns the target only once the
    file is complete, so an app that opens ``M/NAME/file`` blocks in path resolution until the
    file exists and then reads it straight from the node cache: data never crosses this
    daemon, and reads run at page-cache speed.
``none`` mode (no link root)
    Files are regular files whose bytes go through the daemon: ``open`` waits for the file to
    be complete, ``read_buf`` hands libfuse the data file's descriptor and offset so the copy
    happens in C (no Python ``bytes`` per request), and the kernel page cache keeps what was
    read (``keep_cache``): the second read of a file never reaches the daemon.

Besides the models' files the namespace may hold two kinds of entries the mount adds:
*notes*, small read-only files whose bytes the daemon holds (``.left-out/<NAME>``, the
reason a model was left out), and *aliases*, symlinks inside a model's directory to another
file of the same model (``<QUANT>.gguf`` naming the GGUF file of that quantization). An
alias is relative, so following it lands on the model's own entry, fetched as any other.

The namespace never changes while mounted and a file's attributes are the same before and
after it completes (the size comes from the listing or manifest, the fetch is verified
against it), so the kernel may cache entries and attributes for long. libfuse's high-level
API has one timeout for all entries, not one per file, so a single long timeout is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# mfusepy finds libfuse with ctypes.util.find_library, which falls back to running gcc on a
# temporary file: a container with a read-only root filesystem (every injected one) has no
# temporary directory, and the import failed. libfuse3's soname needs no search.
os.environ.setdefault("FUSE_LIBRARY_PATH", "libfuse3.so.3")

import mfusepy

log = logging.getLogger(__name__)

#: Seconds the kernel may cache lookups and attributes: the namespace is immutable.
CACHE_TIMEOUT = 3600.0
#: Largest read request and readahead asked of the kernel (it caps them to what it supports).
MAX_READ = 1 << 20

#: Worker threads of the FUSE loop: blocked fetches in readlink/open each hold one.
MAX_THREADS = 32

_FUSE_BUF_IS_FD = 1 << 1
_FUSE_BUF_FD_SEEK = 1 << 2
_FUSE_BUF_FD_RETRY = 1 << 3
# fuse_common.h capability bits (libfuse 3)
_FUSE_CAP_ASYNC_READ = 1 << 0
_FUSE_CAP_SPLICE_WRITE = 1 << 7
_FUSE_CAP_SPLICE_MOVE = 1 << 8
_FUSE_CAP_CACHE_SYMLINKS = 1 << 23


class _BufVec1(ctypes.Structure):
    """``struct fuse_bufvec`` with its one inline ``struct fuse_buf`` (``buf[1]`` in C)."""

    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", mfusepy.fuse_buf * 1),
    ]


class FileProvider(Protocol):
    """Where complete data files come from (implemented by ``sidecar.mount``)."""

    def ensure_file(self, model: str, relpath: str) -> Path:
        """Block until the file is complete in the node cache; return its data path.

        Raise ``OSError`` with an errno for the app (``EIO`` when the fetch failed,
        ``EACCES`` when the source refused, ``ESHUTDOWN`` when shutting down).
        """
        ...


@dataclass(frozen=True)
class FileEntry:
    model: str
    relpath: str
    size: int


def _parts(relpath: str, what: str) -> list[str]:
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{what}: unsafe path {relpath!r}")
    return parts


class Namespace:
    """The fixed tree: model names at the top, their files below, directories synthesized.

    ``notes`` are read-only files at paths outside every model (their bytes are the
    value); ``aliases`` maps a model name to ``{name in the model's directory: path of the
    file it links to}``.
    """

    def __init__(
        self,
        models: Mapping[str, Iterable[tuple[str, int]]],
        *,
        notes: Mapping[str, bytes] | None = None,
        aliases: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.files: dict[str, FileEntry] = {}
        self.notes: dict[str, bytes] = {}
        self.aliases: dict[str, str] = {}
        self.dirs: dict[str, list[str]] = {"/": []}
        children: dict[str, set[str]] = {"/": set()}
        for name, files in models.items():
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"model name {name!r} cannot be a directory name")
            children["/"].add(name)
            children.setdefault(f"/{name}", set())
            for relpath, size in files:
                parts = relpath.split("/")
                if any(p in ("", ".", "..") for p in parts):
                    raise ValueError(f"model {name}: unsafe path {relpath!r}")
                parent = f"/{name}"
                for part in parts[:-1]:
                    child = f"{parent}/{part}"
                    if child in self.files:
                        raise ValueError(f"model {name}: {relpath!r} is below a file")
                    children[parent].add(part)
                    children.setdefault(child, set())
                    parent = child
                path = f"{parent}/{parts[-1]}"
                if path in children:
                    raise ValueError(f"model {name}: {relpath!r} is both a file and a directory")
                children[parent].add(parts[-1])
                self.files[path] = FileEntry(name, relpath, size)
        for name, links in (aliases or {}).items():
            if f"/{name}" not in children:
                raise ValueError(f"alias in {name!r}: no such model")
            for alias, target in links.items():
                _parts(target, f"alias {name}/{alias}")
                path = f"/{name}/{alias}"
                if "/" in alias or alias in ("", ".", ".."):
                    raise ValueError(f"alias {alias!r} in {name!r}: must be a plain file name")
                if path in self.files or path in children:
                    raise ValueError(f"alias {name}/{alias}: the model has that path already")
                if f"/{name}/{target}" not in self.files:
                    raise ValueError(f"alias {name}/{alias}: {target!r} is not a file of it")
                children[f"/{name}"].add(alias)
                self.aliases[path] = target
        for relpath, data in (notes or {}).items():
            parts = _parts(relpath, "note")
            if not parts[0].startswith("."):
                raise ValueError(f"note {relpath!r}: must be below a hidden top directory")
            parent = ""
            for part in parts[:-1]:
                children.setdefault(parent or "/", set()).add(part)
                parent = f"{parent}/{part}"
                if parent in self.notes:
                    raise ValueError(f"note {relpath!r} is below another note")
                children.setdefault(parent, set())
            path = f"{parent}/{parts[-1]}"
            if path in children or path in self.notes:
                raise ValueError(f"note {relpath!r} clashes with another entry")
            children[parent or "/"].add(parts[-1])
            self.notes[path] = bytes(data)
        self.dirs = {d: sorted(c) for d, c in children.items()}


class ModelFS(mfusepy.Operations):  # type: ignore[misc]
    """FUSE operations over a :class:`Namespace`; read-only (the mount is ``ro`` as well)."""

    use_ns = True  # times in integer nanoseconds (the binding warns otherwise)

    def __init__(
        self,
        namespace: Namespace,
        provider: FileProvider,
        link_target: Callable[[FileEntry], str | None] | None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.ns = namespace
        self.provider = provider
        self.link_target = link_target
        self.on_ready = on_ready
        self.started_ns = time.time_ns()
        self.uid = os.getuid()
        self.gid = os.getgid()

    # -- connection setup -------------------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.entry_timeout = CACHE_TIMEOUT
            config.attr_timeout = CACHE_TIMEOUT
            config.negative_timeout = CACHE_TIMEOUT
            # the page cache of a file survives open/close: its bytes never change
            config.kernel_cache = 1
        if conn is not None:
            conn.max_readahead = MAX_READ
            conn.max_read = MAX_READ  # must equal the max_read mount option
            # A link target is answered only once its file is complete and never changes
            # after that, so the kernel may keep it: later opens skip the daemon entirely.
            want = _FUSE_CAP_ASYNC_READ | _FUSE_CAP_CACHE_SYMLINKS
            if conn.capable & _FUSE_CAP_SPLICE_WRITE:
                want |= _FUSE_CAP_SPLICE_WRITE
            if conn.capable & _FUSE_CAP_SPLICE_MOVE:
                want |= _FUSE_CAP_SPLICE_MOVE
            conn.want |= want & conn.capable
        log.info("FUSE connection ready (%d files)", len(self.ns.files))
        if self.on_ready is not None:
            self.on_ready()

    # -- namespace --------------------------------------------------------------------------
    def _attrs(self, mode: int, size: int, nlink: int) -> dict[str, Any]:
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_atime": self.started_ns,
            "st_mtime": self.started_ns,
            "st_ctime": self.started_ns,
            "st_blocks": (size + 511) // 512,
            "st_blksize": MAX_READ,
        }

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        entry = self.ns.files.get(path)
        if entry is not None:
            target = self.link_target(entry) if self.link_target is not None else None
            if target is not None:
                return self._attrs(stat.S_IFLNK | 0o777, len(target.encode()), 1)
            return self._attrs(stat.S_IFREG | 0o444, entry.size, 1)
        alias = self.ns.aliases.get(path)
        if alias is not None:
            return self._attrs(stat.S_IFLNK | 0o777, len(alias.encode()), 1)
        note = self.ns.notes.get(path)
        if note is not None:
            return self._attrs(stat.S_IFREG | 0o444, len(note), 1)
        if path in self.ns.dirs:
            return self._attrs(stat.S_IFDIR | 0o555, 0, 2)
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        names = self.ns.dirs.get(path)
        if names is None:
            known = path in self.ns.files or path in self.ns.notes or path in self.ns.aliases
            raise mfusepy.FuseOSError(errno.ENOTDIR if known else errno.ENOENT)
        return [".", "..", *names]

    def readlink(self, path: str) -> str:
        alias = self.ns.aliases.get(path)
        if alias is not None:
            return alias  # relative: resolving it goes through the target's own entry
        entry = self.ns.files.get(path)
        if entry is None:
            raise mfusepy.FuseOSError(errno.ENOENT if path not in self.ns.notes else errno.EINVAL)
        target = self.link_target(entry) if self.link_target is not None else None
        if target is None:
            raise mfusepy.FuseOSError(errno.EINVAL)
        # The target is returned only once it exists complete: path resolution of an app
        # that opens the file waits here for the fetch instead of failing with ENOENT.
        self.provider.ensure_file(entry.model, entry.relpath)
        return target

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def access(self, path: str, amode: int) -> int:
        if not (
            path in self.ns.files
            or path in self.ns.dirs
            or path in self.ns.notes
            or path in self.ns.aliases
        ):
            raise mfusepy.FuseOSError(errno.ENOENT)
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    # -- data (none mode) -------------------------------------------------------------------
    def open(self, path: str, fi: Any) -> int:
        entry = self.ns.files.get(path)
        note = self.ns.notes.get(path)
        if entry is None and note is None:
            raise mfusepy.FuseOSError(errno.ENOENT if path not in self.ns.dirs else errno.EISDIR)
        if fi.flags & os.O_ACCMODE != os.O_RDONLY or fi.flags & os.O_TRUNC:
            raise mfusepy.FuseOSError(errno.EROFS)
        if note is not None:
            # a memfd holding the bytes: read_buf serves it like any data file
            fi.fh = os.memfd_create("modelcache-note", os.MFD_CLOEXEC)
            os.pwrite(fi.fh, note, 0)
            fi.keep_cache = 1
            return 0
        assert entry is not None
        data = self.provider.ensure_file(entry.model, entry.relpath)
        fi.fh = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
        fi.keep_cache = 1
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return os.pread(fi.fh, size, offset)

    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        # Hand libfuse the descriptor and offset: it preads (or splices) in C, so the bytes
        # are never copied into Python objects. libfuse frees the vector with free().
        vec_p = _libc.malloc(ctypes.sizeof(_BufVec1))
        if not vec_p:
            raise mfusepy.FuseOSError(errno.ENOMEM)
        vec = _BufVec1.from_address(vec_p)
        vec.count, vec.idx, vec.off = 1, 0, 0
        buf = vec.buf[0]
        buf.size = size
        buf.flags = _FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK | _FUSE_BUF_FD_RETRY
        buf.mem = None
        buf.fd = fi.fh
        buf.pos = offset
        bufpp[0] = ctypes.cast(vec_p, type(bufpp[0]))
        return 0

    def release(self, path: str, fi: Any) -> int:
        os.close(fi.fh)
        return 0


def _load_libc() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    return libc


_libc = _load_libc()


def serve(
    namespace: Namespace,
    provider: FileProvider,
    mountpoint: str,
    link_target: Callable[[FileEntry], str | None] | None,
    *,
    fsname: str = "modelcache",
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount and serve until unmounted; blocks. Run it in a thread other than the main one.

    ``mountpoint`` ``/dev/fd/N`` serves a connection someone else mounted already (the CSI
    node plugin hands its descriptor over); libfuse then mounts nothing, and the loop ends
    when the kernel ends the connection (the mount is gone). ``link_target`` returning None
    for an entry serves it as a regular file. ``on_ready`` runs once the kernel's ``INIT``
    is answered: from then on requests are served.

    From a non-main thread libfuse leaves the signal handlers the caller installed alone
    (it only replaces default ones), so the caller decides how SIGTERM is handled.
    """
    ops = ModelFS(namespace, provider, link_target, on_ready)
    mfusepy.FUSE(
        ops,
        mountpoint,
        raw_fi=True,
        foreground=True,
        nothreads=False,
        ro=True,
        fsname=fsname,
        subtype="modelcache",
        default_permissions=True,
        allow_other=os.getuid() == 0,
        max_read=MAX_READ,
        max_threads=MAX_THREADS,
    )
