"""Model sources: list the files of a model and read byte ranges of them.

One small protocol for every scheme (``file``, ``pvc``, ``http(s)``, ``s3``, ``hf``) so the
node cache (``sidecar.cache``) and the FUSE lazy fetch never know where bytes come from.

Credentials come only from the standard environment variables of each ecosystem
(``AWS_*``, ``HF_TOKEN``), i.e. from the pod's own env: the node cache is shared across
namespaces, so :meth:`Source.list_files` doubles as the proof that *this* pod may read the
model before cached bytes are served to it (DESIGN.md, "Bad input never costs data").

Error classes tell the caller what to do next:

* :class:`SourceAccessError`: the credentials cannot read it (401/403/404 or equivalent).
  Never retried, never papered over by a complete cache.
* :class:`SourceUnavailableError`: network error, 5xx, truncated body, timeout. Retried
  with backoff by the cache; after that, a clear error.
* :class:`SourceError`: anything else wrong with the source (bad listing, unsafe path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from sidecar.modelsource import NamedModel

DEFAULT_PVC_ROOT = "/var/run/modelcache/pvc"
#: Seconds without a byte from the source before a read counts as stalled (then retried).
DEFAULT_READ_TIMEOUT = 60.0


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model. ``path`` has already passed through ``layout.safe_relpath``."""

    path: str
    size: int
    sha256: str | None = None


class SourceError(Exception):
    """The source cannot be used; the message is one clear line naming source and cause."""


class SourceAccessError(SourceError):
    """The pod's credentials cannot read the source (401/403/404 or equivalent)."""


class SourceUnavailableError(SourceError):
    """A transient failure (network, 5xx, truncated or stalled body): worth retrying."""


@runtime_checkable
class Source(Protocol):
    """Where the bytes of one model come from.

    ``read_range`` is an async generator: ``async for chunk in src.read_range(p, 0, n)``.
    It yields exactly ``end - start`` bytes or raises (a short body is an error, never a
    silently short file).

    Optional attributes a source may have (read with ``getattr``):

    * ``uses_credentials: bool``: whether requests carry the pod's credentials; decides
      whether a complete cache may be served while the source is unreachable.
    * ``version(path) -> str | None``: an identity of the file's current content (ETag,
      mtime, commit) recorded with a partial download so a resume never mixes two versions.
    """

    async def list_files(self) -> list[RemoteFile]:
        """Every file of the model; also proves the caller's credentials can read it."""
        ...

    def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of ``path`` in chunks."""
        ...

    async def aclose(self) -> None: ...


def open_source(
    model: NamedModel,
    *,
    pvc_root: Path | str = DEFAULT_PVC_ROOT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> Source:
    """The source for ``model``; credentials from the standard env vars only. No I/O here."""
    src = model.source
    if src.scheme == "file":
        from sidecar.sources.local import LocalSource

        return LocalSource(Path(src.location), uri=src.uri)
    if src.scheme == "pvc":
        from sidecar.sources.local import LocalSource

        claim = src.pvc_claim or ""
        root = Path(pvc_root) / claim
        return LocalSource(
            root / src.pvc_subpath if src.pvc_subpath else root,
            uri=src.uri,
            missing_hint=f"is claim {claim!r} mounted at {root}?",
        )
    if src.scheme in ("http", "https"):
        from sidecar.sources.http import HttpSource

        return HttpSource(f"{src.scheme}://{src.location}", read_timeout=read_timeout)
    if src.scheme == "s3":
        from sidecar.sources.s3 import S3Source

        bucket, _, prefix = src.location.partition("/")
        return S3Source(bucket, prefix, read_timeout=read_timeout)
    if src.scheme == "hf":
        from sidecar.sources.hf import HfSource

        return HfSource(src.location, src.revision or "main", read_timeout=read_timeout)
    raise SourceError(f"{src.uri}: scheme {src.scheme!r} has no source implementation")


__all__ = [
    "DEFAULT_PVC_ROOT",
    "RemoteFile",
    "Source",
    "SourceAccessError",
    "SourceError",
    "SourceUnavailableError",
    "open_source",
]
