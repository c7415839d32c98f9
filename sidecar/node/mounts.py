"""mount(2) and umount2(2) for the node plugin, through ctypes (no ``mount`` binary).

The ``mount`` command would look for a ``mount.fuse.<subtype>`` helper for a FUSE type and
parses options its own way; the syscalls take exactly the flags and data we mean. Every
function raises :class:`MountError` naming the call, the paths and the errno text.

Read-only bind mounts take two calls: the kernel ignores ``MS_RDONLY`` on the first
``MS_BIND`` and applies it only on a ``MS_REMOUNT | MS_BIND`` of the new mount point.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path
from typing import Any, Final

from sidecar.probe import read_mounts

MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_BIND: Final = 0x1000
MNT_DETACH: Final = 0x2
UMOUNT_NOFOLLOW: Final = 0x8

#: The FUSE filesystem type the plugin mounts (``/proc/mounts`` shows ``fuse.modelcache``).
FUSE_TYPE: Final = "fuse.modelcache"
#: The tmpfs that holds a view's model directories: small, it only holds empty directories.
VIEW_TMPFS_DATA: Final = "mode=0755,size=64k,nr_inodes=1024"


class MountError(OSError):
    """A mount or unmount failed; the message names the call and the paths."""


def _load_libc() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    libc.mount.restype = ctypes.c_int
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.umount2.restype = ctypes.c_int
    return libc


_libc = _load_libc()


def _b(value: str | Path | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | Path | None,
    target: str | Path,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    """``mount(2)``; raises :class:`MountError`."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise MountError(
            err, f"mount {source or '-'} on {target} (type {fstype or '-'}): {os.strerror(err)}"
        )


def bind_readonly(source: str | Path, target: str | Path) -> None:
    """Bind ``source`` on ``target`` read-only, nosuid, nodev (``target`` must exist)."""
    mount(source, target, None, MS_BIND)
    try:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    except MountError:
        unmount(target)
        raise


def mount_view_root(target: str | Path) -> None:
    """A small tmpfs on ``target`` to hold one directory per model (made read-only later)."""
    mount("modelcache", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, VIEW_TMPFS_DATA)


def seal_view_root(target: str | Path) -> None:
    """Remount the view's tmpfs read-only: nothing can be added beside the models."""
    mount(
        None,
        target,
        None,
        MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
        VIEW_TMPFS_DATA,
    )


def mount_fuse(target: str | Path, fuse_fd: int) -> None:
    """Mount the FUSE connection of ``fuse_fd`` (an open ``/dev/fuse``) on ``target``.

    Read-only, nosuid, nodev; ``allow_other`` because the server runs as another user than
    the pod's app; ``default_permissions`` so the kernel enforces the modes it reports.
    """
    st = os.stat(target)
    rootmode = f"{st.st_mode & 0o170000:o}"
    data = f"fd={fuse_fd},rootmode={rootmode},user_id=0,group_id=0,allow_other,default_permissions"
    mount("modelcache", target, FUSE_TYPE, MS_RDONLY | MS_NOSUID | MS_NODEV, data)


def unmount(target: str | Path, *, lazy: bool = False) -> None:
    """``umount2(2)`` without following a symlink at ``target``; EINVAL (not a mount point)
    and ENOENT count as already unmounted."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(_b(target), flags) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise MountError(err, f"unmount {target}: {os.strerror(err)}")


def mount_points() -> list[tuple[str, str]]:
    """``(mount point, filesystem type)`` of every mount in this mount namespace, in order."""
    return [(e.mountpoint, e.fstype) for e in read_mounts()]


def mounts_under(path: str | Path) -> list[str]:
    """Mount points at or below ``path``, deepest (and most recent) first."""
    root = os.path.normpath(path)
    found = [p for p, _ in mount_points() if p == root or p.startswith(root + "/")]
    return list(reversed(found))


def is_mount_point(path: str | Path) -> bool:
    root = os.path.normpath(path)
    return any(p == root for p, _ in mount_points())


def unmount_tree(path: str | Path) -> list[str]:
    """Unmount everything at or below ``path``, deepest first; a mount that stays busy is
    detached lazily (it goes away when its last user does). Returns what was unmounted."""
    done = []
    for point in mounts_under(path):
        try:
            unmount(point)
        except MountError as exc:
            if exc.errno != errno.EBUSY:
                raise
            unmount(point, lazy=True)
        done.append(point)
    return done
