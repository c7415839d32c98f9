"""``file:///path`` and ``pvc://claim/sub``: a directory on a local or mounted filesystem.

A ``pvc://`` source is the claim mounted (read-only) into the warm-up and sidecar containers
at ``<pvc-root>/<claim>``; from here on it is just a directory. Reads run in threads so a
slow network filesystem behind the claim never blocks the event loop.

Where a local source may read (the node cache is shared by every namespace on the node, so
a path is an access decision, not a detail):

* A ``file://`` source is read only when its real path (symlinks resolved) is under one of
  the roots the cluster admin configured (``--file-root``, none by default: then every
  ``file://`` source is refused). A ``pvc://`` source must stay inside its own claim.
* Neither may overlap a private directory (the node cache itself): a root that contains the
  cache would otherwise hand out every tenant's cached model.
* Symlinks inside the source are followed only when their target is inside the source too
  (a layout that links shards to a shared blob directory of the same model works). A symlink
  that leads outside is **refused**, with an error naming it, rather than skipped: a skipped
  file would leave a model silently missing a shard (a confusing load error much later), and
  a refusal makes the attempt visible in ``kubectl logs``. A symlink loop is refused too.
* What was listed is what is read: every file is opened, then its descriptor is checked
  (``/proc/self/fd``: the real path it was opened at, inside the source; device and inode,
  the ones listed), so swapping a file or a directory for a symlink after the listing cannot
  redirect the copy.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Sequence
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


def is_inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it; both absolute and already resolved."""
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/") or root == ""


def _overlaps(a: str, b: str) -> bool:
    return is_inside(a, b) or is_inside(b, a)


class LocalSource:
    """A model directory on the local filesystem.

    ``allowed_roots``: the real path of ``root`` must be under one of them (an empty list
    refuses every path; ``None`` means no restriction, for callers that build the source
    from a path they trust themselves). ``private_dirs``: directories the source may neither
    be inside of nor contain. ``kind`` names the restriction in errors.
    """

    uses_credentials = True  # file permissions are the access control: never bypass them

    def __init__(
        self,
        root: Path,
        *,
        uri: str,
        missing_hint: str = "",
        allowed_roots: Sequence[Path | str] | None = None,
        private_dirs: Sequence[Path | str] = (),
        kind: str = "--file-root",
    ) -> None:
        self.root = root
        self.uri = uri
        self._hint = missing_hint
        self._allowed = None if allowed_roots is None else [str(r) for r in allowed_roots]
        self._private = [str(p) for p in private_dirs]
        self._kind = kind
        self._real_root: str | None = None
        self._versions: dict[str, str] = {}
        self._inodes: dict[str, tuple[int, int]] = {}

    # ---- where it may read ---------------------------------------------------------------

    def _check_root(self) -> str:
        """The real path of the source, after the root and private-directory checks."""
        if self._allowed is not None and not self._allowed:
            raise SourceForbiddenError(
                f"{self.uri}: file:// sources are not allowed on this node (no {self._kind} "
                "is configured; the cluster admin lists the directories file:// may read)"
            )
        real = os.path.realpath(self.root)
        if self._allowed is not None:
            roots = [os.path.realpath(r) for r in self._allowed]
            if not any(is_inside(real, r) for r in roots):
                shown = real if real == str(self.root) else f"{self.root} (really {real})"
                raise SourceForbiddenError(
                    f"{self.uri}: {shown} is outside the allowed {self._kind} "
                    f"({', '.join(roots)}); refusing to read it"
                )
        for private in self._private:
            if _overlaps(real, os.path.realpath(private)):
                raise SourceForbiddenError(
                    f"{self.uri}: {real} overlaps the node cache {private}; a model source "
                    "may never read the cache itself"
                )
        return real

    # ---- listing -------------------------------------------------------------------------

    def _walk(self) -> list[RemoteFile]:
        real_root = self._check_root()
        try:
            st = os.stat(real_root)
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
        if not os.access(real_root, os.R_OK | os.X_OK):
            raise SourceForbiddenError(f"{self.uri}: permission denied reading {self.root}")
        self._real_root = real_root
        self._versions.clear()
        self._inodes.clear()
        files: list[RemoteFile] = []
        # (directory, its relative prefix, (dev, ino) of it and its parents: loop guard)
        stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
            (real_root, "", frozenset({(st.st_dev, st.st_ino)}))
        ]
        while stack:
            dirpath, prefix, ancestors = stack.pop()
            try:
                with os.scandir(dirpath) as it:
                    names = sorted(e.name for e in it)
            except OSError as exc:
                raise SourceAccessError(
                    f"{self.uri}: cannot list {dirpath}: {exc.strerror}"
                ) from None
            subdirs: list[tuple[str, str, frozenset[tuple[int, int]]]] = []
            for name in names:
                full = os.path.join(dirpath, name)
                rel = prefix + name
                fst = self._stat_entry(full, rel, real_root)
                if fst is None:
                    continue
                if stat.S_ISDIR(fst.st_mode):
                    ident = (fst.st_dev, fst.st_ino)
                    if ident in ancestors:
                        raise SourceError(f"{self.uri}: {rel} is a symlink loop; refusing it")
                    subdirs.append((full, rel + "/", ancestors | {ident}))
                    continue
                if not stat.S_ISREG(fst.st_mode):
                    continue  # sockets, fifos: not model files
                try:
                    path = safe_relpath(rel)
                except UnsafePathError as exc:
                    raise SourceError(f"{self.uri}: {exc}") from None
                if not os.access(full, os.R_OK):
                    raise SourceForbiddenError(f"{self.uri}: permission denied reading {rel}")
                self._versions[path] = f"{fst.st_size}-{fst.st_mtime_ns}"
                self._inodes[path] = (fst.st_dev, fst.st_ino)
                files.append(RemoteFile(path, fst.st_size))
            stack.extend(reversed(subdirs))
        return files

    def _stat_entry(self, full: str, rel: str, real_root: str) -> os.stat_result | None:
        """The entry's stat, following a symlink only when it stays inside the source."""
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return None  # removed while we listed
        except OSError as exc:
            raise SourceError(f"{self.uri}: cannot stat {rel}: {exc.strerror}") from None
        if not stat.S_ISLNK(st.st_mode):
            return st
        target = os.path.realpath(full)
        if not is_inside(target, real_root):
            raise SourceForbiddenError(
                f"{self.uri}: {rel} is a symlink to {target}, outside the source; "
                "symlinks may only point inside the model directory"
            )
        try:
            return os.stat(full)
        except OSError as exc:
            raise SourceError(
                f"{self.uri}: cannot stat {rel} (symlink to {target}): {exc.strerror}"
            ) from None

    async def list_files(self) -> list[RemoteFile]:
        return await asyncio.to_thread(self._walk)

    def version(self, path: str) -> str | None:
        return self._versions.get(path)

    # ---- reading -------------------------------------------------------------------------

    def open_local(self, path: str) -> int:
        """A read-only descriptor of the listed file ``path`` (blocking; the caller closes it).

        Lets the cache copy with ``copy_file_range`` instead of reads. The descriptor is
        checked after the open (real path inside the source, the listed device and inode),
        so nothing swapped in after the listing is ever read.
        """
        rel = safe_relpath(path)
        listed = self._inodes.get(rel)
        if listed is None or self._real_root is None:
            raise SourceError(f"{self.uri}: {path} was not listed; list the source first")
        try:
            fd = os.open(os.path.join(self._real_root, rel), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceNotFoundError(f"{self.uri}: {path} disappeared from the source") from None
        except PermissionError:
            raise SourceForbiddenError(f"{self.uri}: permission denied reading {path}") from None
        try:
            st = os.fstat(fd)
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if not is_inside(opened, self._real_root):
                raise SourceForbiddenError(
                    f"{self.uri}: {path} now leads to {opened}, outside the source; "
                    "refusing to read it"
                )
            if (st.st_dev, st.st_ino) != listed:
                raise SourceError(
                    f"{self.uri}: {path} was replaced since it was listed; refusing to read it"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(self.open_local, path)
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
