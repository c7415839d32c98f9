"""Model sources: list the files of a model and read byte ranges of them.

One small protocol for every scheme (``file``, ``pvc``, ``http(s)``, ``s3``, ``gs``, ``hf``)
so the node cache (``sidecar.cache``) and the FUSE lazy fetch never know where bytes come
from.

Credentials come only from the standard environment variables of each ecosystem
(``AWS_*``, ``GCS_*``, ``HF_TOKEN``), i.e. from the pod's own env: the node cache is shared
across namespaces, so :meth:`Source.list_files` doubles as the proof that *this* pod may read the
model before cached bytes are served to it (docs/design.md, "Who may touch the node cache").

Error classes tell the caller what to do next; each has a ``kind`` (a short word for logs,
the termination message and metrics) and its message says what to do about it:

* :class:`SourceAccessError`: the credentials cannot read it. Never retried, never papered
  over by a complete cache. Three kinds, told apart where the answer arrives (the HTTP
  status, the S3 error code, the errno), never by matching message text later:
  :class:`SourceNotFoundError` (404, no such bucket/prefix/directory),
  :class:`SourceUnauthorizedError` (401, bad or missing credentials) and
  :class:`SourceForbiddenError` (403: valid credentials without access, gated or private).
* :class:`SourceUnavailableError`: 5xx, truncated or stalled body. Retried with backoff by
  the cache; after that, a clear error. :class:`SourceUnreachableError` is the case with no
  answer at all (DNS, refused connection, connect or read timeout).
* :class:`SourceError`: anything else wrong with the source (bad listing, unsafe path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
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

    kind = "error"


class SourceAccessError(SourceError):
    """The pod's credentials cannot read the source (401/403/404 or equivalent)."""

    kind = "access-denied"


class SourceNotFoundError(SourceAccessError):
    """No such model at the source (HTTP 404, no such bucket or prefix, no such directory)."""

    kind = "not-found"


class SourceUnauthorizedError(SourceAccessError):
    """No credentials, or ones the source rejects (HTTP 401, a bad S3 key or signature)."""

    kind = "unauthorized"


class SourceForbiddenError(SourceAccessError):
    """Valid credentials that may not read it (HTTP 403: a gated or private model)."""

    kind = "forbidden"


class SourceUnavailableError(SourceError):
    """A transient failure (5xx, truncated or stalled body): worth retrying."""

    kind = "unavailable"


class SourceUnreachableError(SourceUnavailableError):
    """No answer at all: DNS failure, refused connection, connect or read timeout."""

    kind = "unreachable"


@runtime_checkable
class Source(Protocol):
    """Where the bytes of one model come from.

    ``read_range`` is an async generator: ``async for chunk in src.read_range(p, 0, n)``.
    It yields exactly ``end - start`` bytes or raises (a short body is an error, never a
    silently short file).

    Optional attributes a source may have (read with ``getattr``):

    * ``uses_credentials: bool``: whether requests carry the pod's credentials; decides
      whether a complete cache may be served while the source is unreachable.
    * ``open_local(path) -> int``: a read-only descriptor of the listed file, for sources on
      a local filesystem (the cache copies it in the kernel).
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


@runtime_checkable
class RefetchableSource(Protocol):
    """A source whose bytes may come from elsewhere than the origin (peers): when a file
    fails verification, ``reject_file`` forgets where its bytes came from and says whether
    a new attempt would read them from somewhere else (then the cache fetches it again)."""

    def reject_file(self, path: str) -> bool: ...


class OriginWrapper:
    """Base of the sources that take bytes from elsewhere (peers, a Dragonfly daemon) but
    answer for ``origin``: its optional abilities pass through unchanged."""

    origin: Source

    @property
    def uses_credentials(self) -> bool:
        return bool(getattr(self.origin, "uses_credentials", True))

    def version(self, path: str) -> str | None:
        version_of = getattr(self.origin, "version", None)
        return version_of(path) if callable(version_of) else None


def open_source(
    model: NamedModel,
    *,
    pvc_root: Path | str = DEFAULT_PVC_ROOT,
    file_roots: Sequence[Path | str] = (),
    private_dirs: Sequence[Path | str] = (),
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Source:
    """The source for ``model``; credentials from the standard env vars only. No I/O here.

    ``file://`` sources are read only under ``file_roots`` (none: every one is refused) and a
    ``pvc://`` source only inside its claim; neither may overlap ``private_dirs`` (the node
    cache). See ``sidecar.sources.local``.

    ``env`` replaces ``os.environ`` as where those variables are read (the node plugin
    passes each pod's own credentials this way, never through its process environment).
    """
    src = model.source
    if src.scheme == "file":
        from sidecar.sources.local import LocalSource

        return LocalSource(
            Path(src.location),
            uri=src.uri,
            allowed_roots=list(file_roots),
            private_dirs=private_dirs,
        )
    if src.scheme == "pvc":
        from sidecar.sources.local import LocalSource

        claim = src.pvc_claim or ""
        root = Path(pvc_root) / claim
        return LocalSource(
            root / src.pvc_subpath if src.pvc_subpath else root,
            uri=src.uri,
            missing_hint=f"is claim {claim!r} mounted at {root}?",
            allowed_roots=[root],
            private_dirs=private_dirs,
            kind="claim mount",
        )
    if src.scheme in ("http", "https"):
        from sidecar.sources.http import HttpSource

        return HttpSource(f"{src.scheme}://{src.location}", read_timeout=read_timeout)
    if src.scheme == "s3":
        from sidecar.sources.s3 import S3Source

        bucket, _, prefix = src.location.partition("/")
        return S3Source(bucket, prefix, read_timeout=read_timeout, env=env)
    if src.scheme == "gs":
        from sidecar.sources.gs import open_gs

        bucket, _, prefix = src.location.partition("/")
        return open_gs(bucket, prefix, read_timeout=read_timeout, env=env)
    if src.scheme == "hf":
        from sidecar.sources.hf import HfSource

        return HfSource(src.location, src.revision or "main", read_timeout=read_timeout, env=env)
    raise SourceError(f"{src.uri}: scheme {src.scheme!r} has no source implementation")


__all__ = [
    "DEFAULT_PVC_ROOT",
    "RefetchableSource",
    "RemoteFile",
    "Source",
    "SourceAccessError",
    "SourceError",
    "SourceForbiddenError",
    "SourceNotFoundError",
    "SourceUnauthorizedError",
    "SourceUnavailableError",
    "SourceUnreachableError",
    "open_source",
]
