"""The pod side of the node plugin's socket: the FUSE descriptor and the live status.

In node mode (``--node-socket``) the warm-up and the sidecar never touch the node cache: the
CSI node plugin fetches, and tells the pod how far it got through a unix socket in the pod's
own ``modelcache-fuse-socket`` emptyDir. Every connection gets a duplicate of the volume's
FUSE descriptor (``SCM_RIGHTS``) and one JSON line, built at connect time::

    {"volume_id": str,
     "models": [{"name", "uri", "cache_key", "state": pending|fetching|complete|failed,
                 "complete", "error", "bytes_done", "bytes_total", "rate",
                 "revision", "commit", "files": [{"path", "size", "complete"}]}]}

So the status is polled by connecting again (about once a second for the warm-up, every half
second while an app waits on a file); a poller that wants only the status closes the
descriptor at once. :class:`StatusTracker` shares one poll among every thread that waits.

Standard library, plus :mod:`sidecar.node.handover` (standard library only: the plugin's
side of the same socket, whose :func:`~sidecar.node.handover.receive_handover` reads a status
line of up to 16 MiB) and the formatting of :mod:`sidecar.progress`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sidecar.node import handover
from sidecar.progress import human_bytes, human_duration

#: Seconds between status polls of a waiting warm-up.
WARMUP_POLL: Final = 1.0
#: Seconds between status polls while an app waits on a file that is not complete yet.
FILE_POLL: Final = 0.5
STATES: Final = ("pending", "fetching", "complete", "failed")


class NodeStatusError(Exception):
    """The node plugin's answer is missing or malformed; the message says which."""


class NodeUnreachableError(NodeStatusError):
    """Nothing listens on the socket (yet): no such file, or connection refused."""


@dataclass(frozen=True)
class FileStatus:
    path: str
    size: int
    complete: bool


@dataclass(frozen=True)
class ModelStatus:
    name: str
    uri: str
    cache_key: str
    state: str
    error: str | None
    bytes_done: int
    bytes_total: int
    rate: float
    revision: str | None
    commit: str | None
    files: tuple[FileStatus, ...]

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def file(self, path: str) -> FileStatus | None:
        for f in self.files:
            if f.path == path:
                return f
        return None


@dataclass(frozen=True)
class VolumeStatus:
    volume_id: str
    models: tuple[ModelStatus, ...]
    received: float  # time.monotonic() when it arrived

    def model(self, name: str) -> ModelStatus | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    @property
    def bytes_done(self) -> int:
        return sum(m.bytes_done for m in self.models)

    @property
    def bytes_total(self) -> int:
        return sum(m.bytes_total for m in self.models)


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise NodeStatusError(f"node status: {where}: {key!r} is {value!r}, not the expected type")
    return value


def _optional_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise NodeStatusError(f"node status: {where}: {key!r} is {value!r}, not a string")
    return value


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    """A count or rate; 0 when the plugin leaves it out."""
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise NodeStatusError(f"node status: {where}: {key!r} is {value!r}, not a number >= 0")
    return float(value)


def parse_status(data: Any, received: float | None = None) -> VolumeStatus:
    """The status line as sent by the node plugin; :class:`NodeStatusError` naming the field."""
    if not isinstance(data, dict):
        raise NodeStatusError(f"node status: expected a JSON object, got {type(data).__name__}")
    volume_id = _field(data, "volume_id", str, "volume")
    raw_models = _field(data, "models", list, "volume")
    models = []
    for i, m in enumerate(raw_models):
        if not isinstance(m, dict):
            raise NodeStatusError(f"node status: models[{i}] is not an object")
        name = _field(m, "name", str, f"models[{i}]")
        where = f"model {name!r}"
        state = _field(m, "state", str, where)
        if state not in STATES:
            raise NodeStatusError(f"node status: {where}: unknown state {state!r}")
        files = []
        for j, f in enumerate(_field(m, "files", list, where)):
            if not isinstance(f, dict):
                raise NodeStatusError(f"node status: {where}: files[{j}] is not an object")
            fwhere = f"{where} files[{j}]"
            files.append(
                FileStatus(
                    _field(f, "path", str, fwhere),
                    _field(f, "size", int, fwhere),
                    _field(f, "complete", bool, fwhere),
                )
            )
        models.append(
            ModelStatus(
                name=name,
                uri=_field(m, "uri", str, where),
                cache_key=_field(m, "cache_key", str, where),
                state=state,
                error=_optional_str(m, "error", where),
                bytes_done=int(_number(m, "bytes_done", where)),
                bytes_total=int(_number(m, "bytes_total", where)),
                rate=_number(m, "rate", where),
                revision=_optional_str(m, "revision", where),
                commit=_optional_str(m, "commit", where),
                files=tuple(files),
            )
        )
    return VolumeStatus(
        volume_id, tuple(models), time.monotonic() if received is None else received
    )


def connect(socket_path: str | Path, timeout: float) -> tuple[int, VolumeStatus]:
    """``(FUSE descriptor, status)`` from the node plugin; the caller owns the descriptor.

    Retries the connection for up to ``timeout`` seconds while nothing listens
    (:func:`sidecar.node.handover.receive_handover`); then :class:`NodeUnreachableError` if
    the socket is not there at all, :class:`NodeStatusError` for anything else.
    """
    try:
        fd, info = handover.receive_handover(socket_path, timeout)
    except handover.HandoverError as exc:
        if not os.path.exists(socket_path):
            raise NodeUnreachableError(
                f"nothing listens on {socket_path}: is the csi.modelcache.io volume of kind "
                "fuse published for this pod?"
            ) from None
        raise NodeStatusError(str(exc)) from None
    try:
        return fd, parse_status(info)
    except NodeStatusError:
        os.close(fd)
        raise


def read_status(socket_path: str | Path, timeout: float) -> VolumeStatus:
    """The status alone (the descriptor that comes with it is closed at once)."""
    fd, status = connect(socket_path, timeout)
    os.close(fd)
    return status


def wait_reachable(
    socket_path: str | Path,
    deadline: float,
    *,
    on_wait: Callable[[str], None] | None = None,
    keep_fd: bool = False,
) -> tuple[int, VolumeStatus]:
    """Connect, retrying while nothing listens until ``deadline`` (``time.monotonic()``);
    ``on_wait`` hears what it waits for when the socket is not there yet. Returns
    ``(fd, status)``; ``fd`` is -1 unless ``keep_fd``."""
    if on_wait is not None and not os.path.exists(socket_path):
        on_wait(
            f"waiting for the node plugin: nothing listens on {socket_path} yet (the "
            "csi.modelcache.io volume of kind fuse is published before the pod's containers "
            "start)"
        )
    fd, status = connect(socket_path, max(0.1, deadline - time.monotonic()))
    if keep_fd:
        return fd, status
    os.close(fd)
    return -1, status


def mismatches(status: VolumeStatus, wanted: Sequence[tuple[str, str]]) -> list[str]:
    """What differs between the ``(name, uri)`` pairs this pod was given and the node's
    status (one line each; empty when they agree)."""
    problems = []
    have = {m.name: m.uri for m in status.models}
    for name, uri in wanted:
        if name not in have:
            problems.append(
                f"model {name!r} ({uri}) is not in the node plugin's volume "
                f"{status.volume_id} (it has: {', '.join(sorted(have)) or 'no model'})"
            )
        elif have[name] != uri:
            problems.append(
                f"model {name!r}: this pod says {uri}, the node plugin's volume says {have[name]}"
            )
    given = {n for n, _ in wanted}
    problems += [
        f"model {n!r} ({have[n]}) is in the node plugin's volume but not given here"
        for n in sorted(set(have) - given)
    ]
    return problems


class RateMeter:
    """Bytes per second from successive statuses, when the node gives no rate."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None

    def rate(self, status: VolumeStatus) -> float:
        node_rate = sum(m.rate for m in status.models if m.state == "fetching")
        if node_rate > 0:
            return node_rate
        if self.first is None:
            self.first = (status.received, status.bytes_done)
            return 0.0
        t0, b0 = self.first
        dt = status.received - t0
        return (status.bytes_done - b0) / dt if dt > 0 else 0.0


def progress_line(status: VolumeStatus, rate: float) -> str:
    """``12.0 MiB / 40.0 MiB (30%), files 3/8, 5.2 MB/s, ETA 5s`` plus what still waits."""
    done, total = status.bytes_done, status.bytes_total
    files = [f for m in status.models for f in m.files]
    pct = 100.0 * done / total if total else 0.0
    head = (
        f"{human_bytes(done)} / {human_bytes(total)} ({pct:.0f}%), "
        f"files {sum(f.complete for f in files)}/{len(files)}"
    )
    left = max(0, total - done)
    if rate > 0:
        eta = human_duration(left / rate) if left else "0s"
        head += f", {rate / 1e6:.1f} MB/s, ETA {eta}"
    else:
        head += ", waiting for the first bytes" if not done else ", no bytes since the last look"
    waiting = [f"{m.name} {m.state}" for m in status.models if not m.complete]
    return f"{head} ({', '.join(waiting)})" if waiting else head


class StatusTracker:
    """The latest status, refreshed at most every ``interval`` seconds however many threads
    wait on it (FUSE workers blocked in ``open``)."""

    def __init__(
        self, socket_path: str | Path, first: VolumeStatus, interval: float = FILE_POLL
    ) -> None:
        self.socket_path = Path(socket_path)
        self.status = first
        self.interval = interval
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def refresh(self) -> VolumeStatus:
        """A status at most ``interval`` old (one poll for every thread that asks)."""
        with self._lock:
            if time.monotonic() - self.status.received >= self.interval:
                self.status = read_status(self.socket_path, 10.0)
            return self.status

    def wait_model_listed(self, name: str, timeout: float) -> ModelStatus:
        """The model's status once it is no longer ``pending`` (its files are known)."""
        deadline = time.monotonic() + timeout
        while True:
            model = self.status.model(name)
            if model is None or model.state != "pending":
                assert model is not None, name
                return model
            if time.monotonic() >= deadline:
                raise NodeStatusError(
                    f"model {name!r}: the node plugin has not listed it after {timeout:g}s"
                )
            self.stopping.wait(self.interval)
            self._refresh_or_keep()

    def _refresh_or_keep(self) -> None:
        # a restarting plugin: the next poll tries again (every caller is bounded)
        with contextlib.suppress(NodeStatusError):
            self.refresh()

    def wait_file(self, name: str, path: str, timeout: float) -> None:
        """Return once ``path`` of model ``name`` is complete on the node; ``OSError`` with
        ``EIO`` if the node's fetch failed, ``ETIMEDOUT`` after ``timeout`` seconds,
        ``ESHUTDOWN`` when stopping."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stopping.is_set():
                raise OSError(errno.ESHUTDOWN, "the mount is shutting down")
            model = self.status.model(name)
            entry = model.file(path) if model is not None else None
            if entry is not None and entry.complete:
                return
            if model is not None and model.failed:
                raise OSError(errno.EIO, f"model {name}: the node's fetch failed: {model.error}")
            if model is not None and model.state == "complete":
                # complete, and this path is not among its files: nothing will ever come
                raise OSError(errno.EIO, f"model {name}: {path} is not among its files")
            if time.monotonic() >= deadline:
                raise OSError(errno.ETIMEDOUT, f"{name}/{path} not complete after {timeout:g}s")
            self.stopping.wait(min(self.interval, max(0.0, deadline - time.monotonic())))
            self._refresh_or_keep()
