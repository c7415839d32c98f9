"""Handing a mounted FUSE connection to the pod's unprivileged sidecar.

The node plugin opens ``/dev/fuse``, mounts it on the volume's target path (only root may)
and keeps the descriptor. It then listens on a unix socket inside a volume of that pod only
(an ``emptyDir`` named :data:`SOCKET_VOLUME`, mounted into the sidecar); whoever connects
gets a duplicate of the descriptor as ``SCM_RIGHTS`` ancillary data, with one JSON line
describing the volume. The sidecar, running as a non-root user with no capabilities,
serves FUSE on ``/dev/fd/N``: libfuse takes that mountpoint to mean "already mounted, here
is the connection". Reaching the socket takes access to that pod's volume, which only the
pod's own containers (and root on the node) have.

The plugin keeps listening until the volume is unpublished, so a sidecar that restarts
connects again and goes on serving the same mount (requests wait in the kernel meanwhile).

Unix socket paths are limited to 107 bytes and a kubelet volume path can be longer, so both
sides open the socket's directory and use ``/proc/self/fd/<dirfd>/<name>``.

Standard library only: the sidecar side (:func:`receive_fd`) imports nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

#: The pod volume (an emptyDir) that carries the socket; its name is part of the contract
#: between the webhook (which adds it) and the node plugin (which finds it by name).
SOCKET_VOLUME: Final = "modelcache-fuse-socket"
#: The socket's file name inside that volume.
SOCKET_NAME: Final = "socket"
#: ``/dev/fuse`` is the misc character device 10:229.
_FUSE_DEV: Final = (10, 229)
_MAX_INFO: Final = 64 << 10


class HandoverError(Exception):
    """The descriptor could not be passed or received; the message says why."""


@contextlib.contextmanager
def _short_path(path: str | Path) -> Iterator[str]:
    """A path to ``path`` short enough for ``sockaddr_un``, valid while the block runs."""
    p = Path(path)
    if len(os.fsencode(p)) < 100:
        yield str(p)
        return
    dfd = os.open(p.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{p.name}"
    finally:
        os.close(dfd)


def is_fuse_device(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == _FUSE_DEV


def listen(socket_path: str | Path) -> socket.socket:
    """A non-blocking listening socket at ``socket_path`` (a stale file there is replaced).

    Mode 0666: the sidecar runs as an arbitrary non-root user; the directory it lives in
    is what limits who can reach it.
    """
    path = Path(socket_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _short_path(path) as short:
            sock.bind(short)
            os.chmod(short, 0o666)
        sock.listen(4)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise HandoverError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def send_fd(conn: socket.socket, fd: int, info: dict[str, Any]) -> None:
    """Send ``fd`` and one JSON line of ``info`` over an accepted connection."""
    payload = json.dumps(info, sort_keys=True).encode() + b"\n"
    conn.setblocking(True)
    conn.settimeout(5.0)
    socket.send_fds(conn, [payload], [fd])


def receive_handover(socket_path: str | Path, timeout: float) -> tuple[int, dict[str, Any]]:
    """Connect to the plugin's socket and return ``(fd, info)``; the caller owns ``fd``.

    Retries the connection until ``timeout`` seconds have passed (the socket appears when
    the volume is published, before any container of the pod starts, so a wait is rare).
    Raises :class:`HandoverError` if nothing arrives, or what arrives is not a FUSE device.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    last: OSError | None = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with _short_path(socket_path) as short:
                sock.connect(short)
            msg, fds, _flags, _addr = socket.recv_fds(sock, _MAX_INFO, 4)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            last = exc
            sock.close()
            if time.monotonic() + delay > deadline:
                raise HandoverError(
                    f"no FUSE descriptor from the node plugin at {socket_path} within "
                    f"{timeout:g}s ({last.strerror}); is the csi.modelcache.io volume "
                    "published for this pod?"
                ) from None
            time.sleep(delay)  # waiting for the plugin to listen, bounded by the deadline
            delay = min(delay * 2, 1.0)
        except OSError as exc:
            sock.close()
            raise HandoverError(
                f"receiving the FUSE descriptor from {socket_path}: {exc.strerror or exc}"
            ) from None
    sock.close()
    if len(fds) != 1:
        for extra in fds:
            os.close(extra)
        raise HandoverError(f"{socket_path}: expected one descriptor, got {len(fds)}")
    fd = fds[0]
    if not is_fuse_device(fd):
        os.close(fd)
        raise HandoverError(f"{socket_path}: the descriptor received is not /dev/fuse")
    try:
        info = json.loads(msg.decode() or "{}")
    except ValueError:
        os.close(fd)
        raise HandoverError(f"{socket_path}: malformed volume description {msg[:80]!r}") from None
    if not isinstance(info, dict):
        os.close(fd)
        raise HandoverError(f"{socket_path}: malformed volume description {msg[:80]!r}")
    os.set_inheritable(fd, True)
    return fd, info


def receive_fd(socket_path: str | Path, timeout: float) -> int:
    """The FUSE descriptor of this pod's volume; serve it with FUSE on ``/dev/fd/<fd>``."""
    fd, _info = receive_handover(socket_path, timeout)
    return fd
