"""The hand-over's status line and the volume attributes, without a plugin or a mount.

A thread plays the node plugin on a real unix socket (``handover.listen`` and ``send_fd``
with a real ``/dev/fuse`` descriptor); the test is the pod side (``receive_handover``,
``read_status``)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.node import handover
from sidecar.node.publish import (
    INCLUDE_ATTR,
    ErrorKind,
    PublishError,
    parse_volume_context,
)

pytestmark = pytest.mark.skipif(
    not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="needs /dev/fuse to hand over"
)


class FakePlugin:
    """Accepts connections on ``path`` and answers each with ``send(conn, fuse_fd)``."""

    def __init__(self, path: Path, send: Any) -> None:
        self.listener = handover.listen(path)
        self.listener.setblocking(True)
        self.fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self.send = send
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                try:
                    self.send(conn, self.fuse)
                except (OSError, handover.HandoverError) as exc:  # the test asserts on them
                    self.errors.append(exc)

    def close(self) -> None:
        if self.fuse < 0:
            return
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=10)
        os.close(self.fuse)
        self.fuse = -1


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "socket"


@contextlib.contextmanager
def serving(path: Path, send: Any) -> Iterator[FakePlugin]:
    plugin = FakePlugin(path, send)
    try:
        yield plugin
    finally:
        plugin.close()


def status_of(n_files: int) -> dict[str, Any]:
    files = [
        {"path": f"shard-{i:05d}/model-{i:05d}-of-{n_files:05d}.safetensors", "size": i * 7919}
        | {"complete": i % 3 == 0}
        for i in range(n_files)
    ]
    return {
        "volume_id": "csi-1",
        "models": [
            {
                "name": "big",
                "uri": "hf://acme/big",
                "cache_key": "big-0123",
                "state": "fetching",
                "complete": False,
                "error": None,
                "bytes_done": 1,
                "bytes_total": 2,
                "rate": 1.5,
                "revision": "main",
                "commit": "a" * 40,
                "files": files,
            }
        ],
    }


def test_a_status_of_3000_files_and_one_of_7_mib_cross_whole(sock_path: Path) -> None:
    for n in (3000, 90_000):  # 260 KiB and 7.7 MiB
        status = status_of(n)
        line = handover.encode_status(status)
        assert 200_000 < len(line) <= handover.MAX_STATUS
        with serving(sock_path, lambda conn, fd, s=status: handover.send_fd(conn, fd, s)) as plugin:
            fd, info = handover.receive_handover(sock_path, timeout=10)
            try:
                assert handover.is_fuse_device(fd)
            finally:
                os.close(fd)
            assert info == status
            assert handover.read_status(sock_path, timeout=10) == status
            assert not plugin.errors


def test_read_status_closes_the_descriptor_it_gets(sock_path: Path) -> None:
    status = status_of(3)
    with serving(sock_path, lambda conn, fd: handover.send_fd(conn, fd, status)):
        before = set(os.listdir("/proc/self/fd"))
        for _ in range(20):
            assert handover.read_status(sock_path, timeout=10) == status
        assert set(os.listdir("/proc/self/fd")) <= before | {"0", "1", "2"}


def test_a_status_over_16_mib_is_refused_by_the_sender() -> None:
    with pytest.raises(handover.HandoverError, match="more than the 16777216"):
        handover.encode_status({"blob": "x" * handover.MAX_STATUS})


def test_the_receiver_stops_reading_past_16_mib(sock_path: Path) -> None:
    sent: list[int] = []

    def flood(conn: socket.socket, fd: int) -> None:
        socket.send_fds(conn, [b'{"x": "'], [fd])
        chunk = b"y" * (1 << 20)
        for _ in range(64):
            conn.sendall(chunk)  # an OSError once the receiver has hung up
            sent.append(len(chunk))

    with serving(sock_path, flood) as plugin:
        with pytest.raises(handover.HandoverError, match="exceeds 16777216 bytes"):
            handover.receive_handover(sock_path, timeout=10)
        plugin.close()
    # the receiver hung up after 16 MiB and a little: the sender was cut off, not drained
    assert [type(e) for e in plugin.errors] in ([BrokenPipeError], [ConnectionResetError])
    assert sum(sent) < 32 << 20


def test_a_line_cut_short_is_malformed_and_its_descriptor_closed(sock_path: Path) -> None:
    def cut(conn: socket.socket, fd: int) -> None:
        socket.send_fds(conn, [b'{"volume_id": "csi-1", "mod'], [fd])

    with serving(sock_path, cut):
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(handover.HandoverError, match="malformed volume description"):
            handover.receive_handover(sock_path, timeout=10)
        assert set(os.listdir("/proc/self/fd")) <= before


def test_two_descriptors_are_refused(sock_path: Path) -> None:
    def two(conn: socket.socket, fd: int) -> None:
        socket.send_fds(conn, [b"{}\n"], [fd, fd])

    with (
        serving(sock_path, two),
        pytest.raises(handover.HandoverError, match="expected one descriptor, got 2"),
    ):
        handover.receive_handover(sock_path, timeout=10)


# ---- the include attribute --------------------------------------------------------------


def _ctx(**attrs: str) -> dict[str, str]:
    return {"csi.storage.k8s.io/ephemeral": "true", "models": "m=hf://acme/m", **attrs}


def test_include_is_parsed_like_the_warmups_globs() -> None:
    assert parse_volume_context(_ctx()).include == ()
    assert parse_volume_context(_ctx(include=" ")).include == ()
    spec = parse_volume_context(_ctx(include=" *.json , *Q4_K_M*.gguf,*.json"))
    assert spec.include == ("*.json", "*Q4_K_M*.gguf")


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("*.json,", "include: '' is not a glob"),
        ("a,,b", "include: '' is not a glob"),
        ("x\ty", "include: 'x\\ty' is not a glob"),
        ("x" * 257, "is not a glob (comma-separated, each 1-256 printable characters)"),
        (",".join(f"g{i}" for i in range(65)), "65 globs, at most 64"),
    ],
)
def test_bad_include_is_refused_naming_the_key(value: str, expect: str) -> None:
    with pytest.raises(PublishError) as err:
        parse_volume_context(_ctx(**{INCLUDE_ATTR: value}))
    assert err.value.kind is ErrorKind.INVALID
    assert expect in str(err.value)
