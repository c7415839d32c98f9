"""Node cache layout: where every role finds what, on the shared hostPath.

One directory per model (per cache key), shared by every pod on the node, written by several
processes at once (``warmup`` in many pods, ``mount --warmup``, the agent's pre-warm)::

    <cache-dir>/
      models/<cache-key>/
        data/<path>            complete, verified files only (appear by atomic rename)
        .partial/<id>.part     downloads in progress (resumable), never visible under data/
        .partial/<id>.json     resume state of that part (size, etag/sha, ranges done)
        .locks/<id>.lock       per-file single-flight lock (fcntl LOCK_EX while fetching)
        .locks/<id>.meta       what the complete file was fetched as (size, sha256, version)
                               and the stamp it was verified at (inode, size, mtime, ctime):
                               a file that changed at the source is fetched again, and one
                               whose stamp changed on disk is verified again before use
        .quarantine/<id>       the last copy of a file that failed re-verification (moved
                               aside, never served; removed with the model)
        .pins/<holder>         a pod using the model (see "Pins" below); mtime = last renewal
        .model.lock            LOCK_SH by every mount serving it and every warm-up filling it;
                               the agent evicts only with LOCK_EX | LOCK_NB
        source.json            {"uri": ..., "key": ...}, written when the directory is created
        manifest.json          written atomically once every file is complete and verified:
                               {"uri", "key", "files": [{"path", "size", "sha256"|null}],
                                "total_bytes", "completed_at"}; its presence = model complete
        .last-used             touched by mount (start, then periodically) and warm-up (end);
                               its mtime orders LRU eviction
      trash/                   evicted model directories are renamed here, then removed

Pins. ``.model.lock`` is held only while a process runs: between the warm-up init container
and the sidecar, and while a crashed sidecar restarts, nothing holds it. Evicting the model
then would leave the pod's read-only view (a bind mount of the old ``data/``) empty for good.
So the warm-up and the mount also write ``.pins/<holder>`` (the pod: ``MODELCACHE_POD`` or
the host name) and the mount renews it while it runs; the agent never evicts a model with a
pin younger than ``PIN_TTL``. A pin outlives a restart (the kubelet restarts a container
within 5 minutes at most) and expires by itself once its pod is gone.

App containers see a model's ``data/`` directory read-only at ``<APP_CACHE_ROOT>/<cache-key>``
(the ``modelcache-cache`` volume with ``subPath: models/<cache-key>/data``). The FUSE mount
presents complete files as symlinks into that view, so the bytes of a model never cross the
FUSE daemon (see docs/design.md, "Measured facts that shape the design"): the kernel reads
them straight from the node cache's page cache. Only the namespace (lookup, listing, lazy
fetch) goes through FUSE.

Pure path arithmetic: no I/O here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Final

MODELS_DIR: Final = "models"
TRASH_DIR: Final = "trash"
DATA_DIR: Final = "data"
PARTIAL_DIR: Final = ".partial"
LOCKS_DIR: Final = ".locks"
MODEL_LOCK: Final = ".model.lock"
SOURCE_FILE: Final = "source.json"
MANIFEST_FILE: Final = "manifest.json"
LAST_USED_FILE: Final = ".last-used"
#: In a model directory: present when the complete copy was fetched with no credentials. Only
#: such a copy may be served to a pod without credentials while the source is unreachable:
#: otherwise a pod with no token would get a private model another tenant fetched.
ANONYMOUS_MARKER: Final = ".fetched-anonymously"
QUARANTINE_DIR: Final = ".quarantine"
PINS_DIR: Final = ".pins"
#: Seconds a pin keeps its model from eviction after its last renewal: more than the mount's
#: renewal period (5 minutes) and the kubelet's longest restart back-off (5 minutes).
PIN_TTL: Final = 900.0

#: Where the sidecar and warm-up containers mount the node cache (hostPath).
CONTAINER_CACHE_DIR: Final = "/var/cache/modelcache"
#: Where app containers see each model's complete files, read-only: ``<root>/<cache-key>``.
APP_CACHE_ROOT: Final = "/var/run/modelcache/models"


class UnsafePathError(ValueError):
    """A path from a listing that would escape the model directory."""


def safe_relpath(path: str) -> str:
    """Normalize a file path from a source listing; refuse absolute paths and ``..``."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise UnsafePathError(f"refusing unsafe path {path!r} from the source listing")
    parts = [p for p in PurePosixPath(path).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise UnsafePathError(f"refusing unsafe path {path!r} from the source listing")
    if parts[0].startswith(".") and parts[0] in (PARTIAL_DIR, LOCKS_DIR):
        raise UnsafePathError(f"refusing reserved path {path!r} from the source listing")
    return "/".join(parts)


def file_id(relpath: str) -> str:
    """Flat, collision-free name for per-file lock and partial files."""
    return hashlib.sha256(relpath.encode()).hexdigest()[:32]


class ModelDir:
    """Paths of one model in the node cache."""

    def __init__(self, cache_dir: Path | str, key: str) -> None:
        self.cache_dir = Path(cache_dir)
        self.key = key
        self.root = self.cache_dir / MODELS_DIR / key

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def partial_dir(self) -> Path:
        return self.root / PARTIAL_DIR

    @property
    def locks_dir(self) -> Path:
        return self.root / LOCKS_DIR

    @property
    def model_lock(self) -> Path:
        return self.root / MODEL_LOCK

    @property
    def source_file(self) -> Path:
        return self.root / SOURCE_FILE

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def last_used(self) -> Path:
        return self.root / LAST_USED_FILE

    def data_file(self, relpath: str) -> Path:
        return self.data / safe_relpath(relpath)

    def partial_file(self, relpath: str) -> Path:
        return self.partial_dir / f"{file_id(relpath)}.part"

    def partial_state(self, relpath: str) -> Path:
        return self.partial_dir / f"{file_id(relpath)}.json"

    def file_lock(self, relpath: str) -> Path:
        return self.locks_dir / f"{file_id(relpath)}.lock"

    def file_meta(self, relpath: str) -> Path:
        return self.locks_dir / f"{file_id(relpath)}.meta"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / QUARANTINE_DIR

    def quarantine_file(self, relpath: str) -> Path:
        return self.quarantine_dir / file_id(relpath)

    @property
    def pins_dir(self) -> Path:
        return self.root / PINS_DIR

    def pin_file(self, holder: str) -> Path:
        return self.pins_dir / holder


def models_root(cache_dir: Path | str) -> Path:
    return Path(cache_dir) / MODELS_DIR


def trash_root(cache_dir: Path | str) -> Path:
    return Path(cache_dir) / TRASH_DIR
