"""Handing a mounted FUSE connection to the pod's unprivileged sidecar.

The node plugin opens ``/dev/fuse``, mounts it on the volume's target path (only root may)
and keeps the descriptor. It then listens on a unix socket inside a volume of that pod only
(an ``emptyDir`` named :data:`SOCKET_VOLUME`, mounted into the sidecar); whoever connects
gets a duplicate of the descriptor as ``SCM_RIGHTS`` ancillary data, with one JSON line:
the volume's live status, built at connect time (each model's state, bytes done and total,
rate, hub commit and the files with their completion; up to :data:`MAX_STATUS` bytes). A
pod-side process that only wants the status (the warm-up) calls :func:`read_status`, which
closes the descriptor. The sidecar, running as a non-root user with no capabilities,
serves FUSE on ``/dev/fd/N``: libfuse takes that mountpoint to mean "already mounted, here
is the connection". Reaching the socket takes access to that pod's volume, which only the
pod's own containers (and root on the node) have.

The plugin keeps listening until the volume is unpublished: the warm-up polls the status
by connecting again. A sidecar that restarts gets the descriptor again but cannot serve the
mount again: the kernel sends FUSE ``INIT`` once per connection and libfuse answers nothing
before it has seen one, so the pod's FUSE view fails with ``EIO`` until the pod is recreated
(the complete files it reads through the view's symlinks are not affected in block mode,
where the app reads the CSI view directly once the links are resolved).

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
#: The largest status line either side accepts (a model of many thousand files fits).
MAX_STATUS: Final = 16 << 20
_FIRST_CHUNK: Final = 64 << 10
#: Seconds the plugin gives a connection to take the whole status line.
SEND_TIMEOUT: Final = 10.0


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


def encode_status(info: dict[str, Any]) -> bytes:
    """The status line as sent: compact JSON and a newline; :class:`HandoverError` past
    :data:`MAX_STATUS`."""
    payload = json.dumps(info, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    if len(payload) > MAX_STATUS:
        raise HandoverError(
            f"the volume status is {len(payload)} bytes, more than the {MAX_STATUS} a "
            "hand-over carries"
        )
    return payload


def send_fd(conn: socket.socket, fd: int, info: dict[str, Any] | bytes) -> None:
    """Send ``fd`` and one JSON line of ``info`` (or a line :func:`encode_status` made)
    over an accepted connection; blocking, at most :data:`SEND_TIMEOUT` seconds."""
    payload = info if isinstance(info, bytes) else encode_status(info)
    conn.setblocking(True)
    conn.settimeout(SEND_TIMEOUT)
    # the descriptor rides on the first bytes; a stream socket may take the rest in pieces
    sent = socket.send_fds(conn, [payload[:_FIRST_CHUNK]], [fd])
    conn.sendall(payload[sent:])


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
            msg, fds, _flags, _addr = socket.recv_fds(sock, _FIRST_CHUNK, 4)
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
    try:
        if len(fds) != 1:
            raise HandoverError(f"{socket_path}: expected one descriptor, got {len(fds)}")
        if not is_fuse_device(fds[0]):
            raise HandoverError(f"{socket_path}: the descriptor received is not /dev/fuse")
        # the line follows at once: reading it gets its own bound, not what is left of the
        # time for the socket to appear
        read_deadline = max(deadline, time.monotonic() + SEND_TIMEOUT)
        msg = _read_line(sock, msg, read_deadline, socket_path)
        try:
            info = json.loads(msg.decode() or "{}")
        except ValueError:
            raise HandoverError(
                f"{socket_path}: malformed volume description {msg[:80]!r}"
            ) from None
        if not isinstance(info, dict):
            raise HandoverError(f"{socket_path}: malformed volume description {msg[:80]!r}")
    except BaseException:
        for received in fds:
            os.close(received)
        raise
    finally:
        sock.close()
    fd = fds[0]
    os.set_inheritable(fd, True)
    return fd, info


def _read_line(sock: socket.socket, head: bytes, deadline: float, where: str | Path) -> bytes:
    """``head`` plus what follows on ``sock`` up to the newline (excluded); bounded by
    :data:`MAX_STATUS` and the deadline."""
    chunks = [head]
    size = len(head)
    while b"\n" not in chunks[-1]:
        if not chunks[-1] and len(chunks) > 1:
            break  # end of stream before a newline: parsed as it is (refused if cut short)
        if size > MAX_STATUS:
            raise HandoverError(f"{where}: the volume status exceeds {MAX_STATUS} bytes")
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandoverError(f"{where}: timed out reading the volume status")
        sock.settimeout(max(0.1, left))
        try:
            chunk = sock.recv(1 << 20)
        except OSError as exc:
            raise HandoverError(
                f"{where}: reading the volume status: {exc.strerror or exc}"
            ) from None
        chunks.append(chunk)
        size += len(chunk)
    line, _, _rest = b"".join(chunks).partition(b"\n")
    return line


def receive_fd(socket_path: str | Path, timeout: float) -> int:
    """The FUSE descriptor of this pod's volume; serve it with FUSE on ``/dev/fd/<fd>``."""
    fd, _info = receive_handover(socket_path, timeout)
    return fd


def read_status(socket_path: str | Path, timeout: float) -> dict[str, Any]:
    """The volume's status as the plugin sees it now (the descriptor that comes with it is
    closed at once); retries the connection like :func:`receive_handover`."""
    fd, info = receive_handover(socket_path, timeout)
    os.close(fd)
    return info
