"""``file:///path`` and ``pvc://claim/sub``: a directory on a local or mounted filesystem.

A ``pvc://`` source is the claim mounted (read-only) into the warm-up and sidecar containers
at ``<pvc-root>/<claim>``; from here on it is just a directory. Reads run in threads so a
slow network filesystem behind the claim never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from sidecar.layout import UnsafePathError, safe_relpath
from sidecar.sources import (
    RemoteFile,
    SourceAccessError,
    SourceError,
    SourceForbiddenError,
    SourceNotFoundError,
)

_CHUNK = 4 << 20


class LocalSource:
    """A model directory on the local filesystem."""

    uses_credentials = True  # file permissions are the access control: never bypass them

    def __init__(self, root: Path, *, uri: str, missing_hint: str = "") -> None:
        self.root = root
        self.uri = uri
        self._hint = missing_hint
        self._versions: dict[str, str] = {}

    def _walk(self) -> list[RemoteFile]:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            hint = f" ({self._hint})" if self._hint else ""
            raise SourceNotFoundError(
                f"{self.uri}: directory {self.root} does not exist{hint}"
            ) from None
        except PermissionError as exc:
            raise SourceForbiddenError(
                f"{self.uri}: cannot read {self.root}: {exc.strerror}"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise SourceError(f"{self.uri}: {self.root} is not a directory")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise SourceForbiddenError(f"{self.uri}: permission denied reading {self.root}")
        files: list[RemoteFile] = []

        def onerror(exc: OSError) -> None:
            raise SourceAccessError(f"{self.uri}: cannot list {exc.filename}: {exc.strerror}")

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=onerror):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = full.relative_to(self.root).as_posix()
                try:
                    path = safe_relpath(rel)
                except UnsafePathError as exc:
                    raise SourceError(f"{self.uri}: {exc}") from None
                try:
                    fst = os.stat(full)
                except OSError as exc:
                    raise SourceError(f"{self.uri}: cannot stat {rel}: {exc.strerror}") from None
                if not stat.S_ISREG(fst.st_mode):
                    continue  # sockets, fifos: not model files
                if not os.access(full, os.R_OK):
                    raise SourceAccessError(f"{self.uri}: permission denied reading {rel}")
                self._versions[path] = f"{fst.st_size}-{fst.st_mtime_ns}"
                files.append(RemoteFile(path, fst.st_size))
        return files

    async def list_files(self) -> list[RemoteFile]:
        return await asyncio.to_thread(self._walk)

    def version(self, path: str) -> str | None:
        return self._versions.get(path)

    def local_path(self, path: str) -> Path:
        """The file itself: lets the cache copy with ``copy_file_range`` instead of reads."""
        return self.root / safe_relpath(path)

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        full = self.local_path(path)
        try:
            fd = await asyncio.to_thread(os.open, full, os.O_RDONLY)
        except FileNotFoundError:
            raise SourceNotFoundError(f"{self.uri}: {path} disappeared from the source") from None
        except PermissionError:
            raise SourceForbiddenError(f"{self.uri}: permission denied reading {path}") from None
        try:
            pos = start
            while pos < end:
                n = min(_CHUNK, end - pos)
                data = await asyncio.to_thread(os.pread, fd, n, pos)
                if not data:
                    raise SourceError(
                        f"{self.uri}: {path} is shorter than listed ({pos} < {end} bytes)"
                    )
                pos += len(data)
                yield data
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        return None
