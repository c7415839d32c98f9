"""Hub-cache delivery: a served model in the Hugging Face cache layout.

An app that loads ``org/name`` through a Hugging Face client (vLLM, SGLang, TGI,
transformers, ...) looks in its hub cache directory first. ``python -m sidecar mount
--hub-cache DIR`` writes there, for every ``hf://`` model it serves, the layout the client
itself writes after a download::

    DIR/models--org--name/
      refs/<revision>              the commit the revision resolved to (no newline); left
                                   out when the revision is the commit itself
      snapshots/<commit>/<path>    a symlink to <hub-link-root>/<NAME>/<path>, i.e. to the
                                   file in the FUSE view as the app sees it
      blobs/                       empty; the client puts what it downloads itself here

With this in place the client asks the hub for the commit of the revision (one small API
call), finds every file of that commit in ``snapshots/`` and downloads nothing; with the hub
unreachable it resolves ``refs/<revision>`` and returns the snapshot. Anything else the app
downloads (adapters, draft models, files outside ``--include``) lands beside it as before,
so every directory is writable by any uid (``0o777``): the directory is a volume of this one
pod (an ``emptyDir``) and the app may run as another uid than the sidecar. The client writes
``.no_exist/``, ``trees/`` and new snapshots there.

The writer is idempotent (a restarted sidecar leaves what is right alone, replaces what is
not, and takes its links out of the snapshot of a commit the branch has moved away from)
and atomic per entry: the refs file and every symlink are created under a
temporary name and renamed into place, so a reader sees the old entry or the new one, never
a half-written one.

``plan_repo`` is pure; ``write_repo`` does the I/O. No imports beyond the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

log = logging.getLogger(__name__)

#: Mode of every directory of the layout: the app may run as any uid and writes there.
DIR_MODE: Final = 0o777
#: Mode of a refs file: the client rewrites it when the revision moves.
REF_MODE: Final = 0o666
REFS_DIR: Final = "refs"
SNAPSHOTS_DIR: Final = "snapshots"
BLOBS_DIR: Final = "blobs"
_TMP_PREFIX: Final = ".modelcache-tmp-"
_REPO_PART_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


class HubCacheError(ValueError):
    """A layout that cannot be planned or written; the message names what is wrong."""


def repo_folder_name(repo_id: str) -> str:
    """``org/name`` → ``models--org--name`` (the client's folder name for a model repo)."""
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(_REPO_PART_RE.match(p) for p in parts):
        raise HubCacheError(f"repository id {repo_id!r}: expected org/name")
    return "--".join(["models", *parts])


def _relpath(value: str, what: str) -> str:
    parts = value.split("/")
    if not value or any(p in ("", ".", "..") for p in parts) or "\x00" in value:
        raise HubCacheError(f"{what} {value!r} cannot be a path in the hub cache")
    return value


@dataclass(frozen=True)
class RepoPlan:
    """What the layout of one repository revision must hold (paths relative to the cache).

    ``links`` maps each snapshot entry to its target; ``dirs`` lists every directory the
    layout needs, parents first.
    """

    folder: str
    revision: str
    commit: str
    ref: str | None
    links: tuple[tuple[str, str], ...]
    dirs: tuple[str, ...]
    link_dir: str = ""

    @property
    def snapshot(self) -> str:
        return f"{self.folder}/{SNAPSHOTS_DIR}/{self.commit}"


def plan_repo(
    repo_id: str, revision: str, commit: str, files: Iterable[str], link_dir: str
) -> RepoPlan:
    """The layout for ``files`` (paths in the repo) of ``repo_id`` at ``commit``.

    ``link_dir`` is where the app sees the model's files (``<hub-link-root>/<NAME>``);
    each snapshot entry links to ``link_dir/<path>``.
    """
    folder = repo_folder_name(repo_id)
    _relpath(revision, "revision")
    if "/" in commit:
        raise HubCacheError(f"commit {commit!r} cannot be a directory name")
    _relpath(commit, "commit")
    if not link_dir.startswith("/"):
        raise HubCacheError(f"link directory {link_dir!r}: expected an absolute path")
    link_dir = link_dir.rstrip("/")
    snapshot = f"{folder}/{SNAPSHOTS_DIR}/{commit}"
    dirs: dict[str, None] = dict.fromkeys(
        [folder, f"{folder}/{BLOBS_DIR}", f"{folder}/{SNAPSHOTS_DIR}", snapshot]
    )
    ref = None
    if revision != commit:
        ref = f"{folder}/{REFS_DIR}/{revision}"
        parent = PurePosixPath(ref).parent
        for p in reversed([parent, *parent.parents]):
            if str(p) not in (".", folder):
                dirs[str(p)] = None
    links: dict[str, str] = {}
    for path in sorted(files):
        _relpath(path, "file")
        entry = f"{snapshot}/{path}"
        for p in reversed(PurePosixPath(entry).parents):
            if len(p.parts) > len(PurePosixPath(snapshot).parts):
                dirs[str(p)] = None
        links[entry] = f"{link_dir}/{path}"
    clash = sorted(set(links) & set(dirs))
    if clash:
        raise HubCacheError(f"{clash[0]!r} is both a file and a directory")
    return RepoPlan(folder, revision, commit, ref, tuple(links.items()), tuple(dirs), link_dir)


@dataclass
class WriteResult:
    """What ``write_repo`` changed (all zero on a second run over the same plan)."""

    dirs: int = 0
    links: int = 0
    ref: bool = False
    pruned: int = 0


def _ensure_dir(path: Path) -> bool:
    """Create ``path`` (mode 0o777); True when it was created."""
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        if path.is_symlink() or not path.is_dir():
            raise HubCacheError(f"{path}: exists and is not a directory") from None
        created = False
    mode = path.stat().st_mode & 0o7777
    if mode != DIR_MODE:
        try:
            os.chmod(path, DIR_MODE)  # the umask narrowed it, or an earlier run did
        except PermissionError:
            # a directory the app created as another uid: it made it, it can write it
            log.warning("%s: cannot make it writable for every uid (mode %o)", path, mode)
    return created


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")


def _ensure_link(path: Path, target: str) -> bool:
    """Make ``path`` a symlink to ``target``, atomically; True when it changed."""
    try:
        if os.readlink(path) == target:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a regular file (the client copied it)
            raise
        if path.is_dir():
            raise HubCacheError(f"{path}: a directory where a file belongs") from None
    tmp = _tmp_name(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    return True


def _ensure_ref(path: Path, commit: str) -> bool:
    """Make the refs file hold exactly ``commit``, atomically; True when it changed."""
    try:
        if path.read_text(encoding="utf-8") == commit:
            return False
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise HubCacheError(f"{path}: a directory where the refs file belongs") from None
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, commit.encode())
        os.fchmod(fd, REF_MODE)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


def write_repo(cache_dir: Path | str, plan: RepoPlan) -> WriteResult:
    """Bring the layout under ``cache_dir`` to ``plan``; raise HubCacheError or OSError.

    ``cache_dir`` must exist. Entries the plan does not name are left alone (the app's
    own downloads live beside ours).
    """
    root = Path(cache_dir)
    if not root.is_dir():
        raise HubCacheError(f"hub cache {root}: not a directory")
    result = WriteResult()
    for rel in plan.dirs:
        result.dirs += _ensure_dir(root / rel)
    for rel, target in plan.links:
        result.links += _ensure_link(root / rel, target)
    if plan.ref is not None:
        result.ref = _ensure_ref(root / plan.ref, plan.commit)
    result.pruned = _prune_other_snapshots(root, plan)
    return result


def _prune_other_snapshots(root: Path, plan: RepoPlan) -> int:
    """Remove our links from snapshots of other commits (an earlier run of this pod laid
    out a commit the branch has moved away from): they lead into the view, which now holds
    the files of ``plan.commit``, and a snapshot must never show another commit's bytes.
    The client's own files there (links into ``blobs/``) stay."""
    if not plan.link_dir:
        return 0
    prefix = plan.link_dir + "/"
    pruned = 0
    snapshots = root / plan.folder / SNAPSHOTS_DIR
    for snap in snapshots.iterdir():
        if snap.name == plan.commit or snap.is_symlink() or not snap.is_dir():
            continue
        for dirpath, _dirs, names in os.walk(snap):
            for name in names:
                path = Path(dirpath) / name
                with contextlib.suppress(OSError):  # not a link, or gone meanwhile
                    if os.readlink(path).startswith(prefix):
                        path.unlink()
                        pruned += 1
    return pruned


def ensure_repo_dir(cache_dir: Path | str, repo_id: str) -> Path:
    """Only the repository's folder (mode 0o777), for a model that gets no layout.

    The app mounts that folder (a ``subPath`` of the volume); were it missing, the kubelet
    would create it owned by root and not writable by an app running as another uid, and
    the client could not download the model there by itself.
    """
    root = Path(cache_dir)
    if not root.is_dir():
        raise HubCacheError(f"hub cache {root}: not a directory")
    path = root / repo_folder_name(repo_id)
    _ensure_dir(path)
    return path


def read_ref(cache_dir: Path | str, repo_id: str, revision: str) -> str | None:
    """The commit ``refs/<revision>`` names in ``cache_dir``, or None."""
    try:
        path = Path(cache_dir) / repo_folder_name(repo_id) / REFS_DIR / _relpath(revision, "rev")
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, HubCacheError, UnicodeDecodeError):
        return None
    return value or None
