"""The client of the node plugin's socket: status parsing, reading, waiting, progress."""

from __future__ import annotations

import copy
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar import nodeclient
from sidecar.nodeclient import (
    NodeStatusError,
    NodeUnreachableError,
    RateMeter,
    StatusTracker,
    mismatches,
    parse_status,
    progress_line,
)


def model(name: str = "llm", **over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "name": name,
        "uri": f"hf://acme/{name}@main",
        "cache_key": f"hf/acme/{name}/main",
        "state": "fetching",
        "complete": False,
        "error": None,
        "bytes_done": 1 << 20,
        "bytes_total": 4 << 20,
        "rate": 0.0,
        "revision": "main",
        "commit": "c" * 40,
        "files": [
            {"path": "config.json", "size": 1 << 20, "complete": True},
            {"path": "model.safetensors", "size": 3 << 20, "complete": False},
        ],
    }
    m.update(over)
    return m


def volume(*models: dict[str, Any]) -> dict[str, Any]:
    return {"volume_id": "csi-1", "models": list(models) or [model()]}


def test_a_status_parses_into_models_and_files() -> None:
    st = parse_status(volume(model(), model("lora", state="complete", commit=None)))
    assert st.volume_id == "csi-1"
    llm = st.model("llm")
    assert llm is not None and llm.state == "fetching" and not llm.complete
    assert llm.file("config.json") == nodeclient.FileStatus("config.json", 1 << 20, True)
    assert llm.file("nope") is None
    lora = st.model("lora")
    assert lora is not None and lora.complete and lora.commit is None
    assert st.bytes_done == 2 << 20 and st.bytes_total == 8 << 20


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda v: v.pop("volume_id"), "volume: 'volume_id' is None"),
        (lambda v: v.update(models={}), "volume: 'models' is {}"),
        (lambda v: v["models"][0].update(state="done"), "model 'llm': unknown state 'done'"),
        (lambda v: v["models"][0].pop("cache_key"), "model 'llm': 'cache_key' is None"),
        (lambda v: v["models"][0]["files"][1].update(size="3"), "files[1]: 'size' is '3'"),
        (lambda v: v["models"][0]["files"][0].update(complete=1), "files[0]: 'complete' is 1"),
        (lambda v: v["models"][0].update(commit=5), "model 'llm': 'commit' is 5"),
        (lambda v: v["models"].append("x"), "models[1] is not an object"),
        (lambda v: v["models"][0].update(bytes_done="1"), "'bytes_done' is '1', not a number"),
        (lambda v: v["models"][0].update(rate=-1.0), "'rate' is -1.0, not a number >= 0"),
    ],
)
def test_a_malformed_status_names_the_field(
    mutate: Callable[[dict[str, Any]], object], expect: str
) -> None:
    data = copy.deepcopy(volume())
    mutate(data)
    with pytest.raises(NodeStatusError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        parse_status(data)


def test_mismatches_name_each_difference() -> None:
    st = parse_status(volume(model("llm"), model("extra")))
    assert mismatches(st, [("llm", "hf://acme/llm@main"), ("extra", "hf://acme/extra@main")]) == []
    got = mismatches(st, [("llm", "hf://acme/other@main"), ("gone", "hf://x/y@main")])
    assert got == [
        "model 'llm': this pod says hf://acme/other@main, the node plugin's volume says "
        "hf://acme/llm@main",
        "model 'gone' (hf://x/y@main) is not in the node plugin's volume csi-1 (it has: extra, "
        "llm)",
        "model 'extra' (hf://acme/extra@main) is in the node plugin's volume but not given here",
    ]


def test_progress_line_shows_percent_rate_and_eta() -> None:
    st = parse_status(volume(model(rate=1e6)))
    line = progress_line(st, RateMeter().rate(st))
    assert line == "1.0 MiB / 4.0 MiB (25%), files 1/2, 1.0 MB/s, ETA 3s (llm fetching)"
    pending = parse_status(volume(model(state="pending", bytes_done=0, bytes_total=0, files=[])))
    assert progress_line(pending, 0.0) == (
        "0 B / 0 B (0%), files 0/0, waiting for the first bytes (llm pending)"
    )


def test_the_rate_comes_from_successive_statuses_when_the_node_gives_none() -> None:
    meter = RateMeter()
    assert meter.rate(parse_status(volume(model(bytes_done=0)), received=10.0)) == 0.0
    later = parse_status(volume(model(bytes_done=4_000_000)), received=12.0)
    assert meter.rate(later) == 2_000_000


# ---- over a real unix socket ----------------------------------------------------------------


class NodeStandIn:
    """Answers each connection with ``fd_factory()`` and the current status line."""

    def __init__(self, path: Path, status: dict[str, Any] | bytes) -> None:
        self.path = path
        self.status = status
        self.fd_factory: Callable[[], int] = lambda: os.open("/dev/fuse", os.O_RDWR)
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                status = self.status
                line = status if isinstance(status, bytes) else json.dumps(status).encode() + b"\n"
                fd = self.fd_factory()
                try:
                    # the descriptor with the first bytes, the rest of a long line after it
                    socket.send_fds(conn, [line[:4096]], [fd])
                    conn.sendall(line[4096:])
                except OSError:
                    pass
                finally:
                    os.close(fd)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeStandIn]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: the hand-over carries a /dev/fuse descriptor")
    n = NodeStandIn(tmp_path / "socket", volume())
    yield n
    n.close()


def test_connect_returns_the_fuse_descriptor_and_a_long_status(node: NodeStandIn) -> None:
    files = [{"path": f"shard-{i:06d}.bin", "size": i, "complete": True} for i in range(60_000)]
    node.status = volume(model(files=files))
    fd, st = nodeclient.connect(node.path, timeout=10)
    try:
        assert os.major(os.fstat(fd).st_rdev) == 10
    finally:
        os.close(fd)
    assert len(json.dumps(node.status)) > 3 << 20
    assert len(st.models[0].files) == 60_000


def test_read_status_closes_the_descriptor(node: NodeStandIn) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        assert nodeclient.read_status(node.path, timeout=10).volume_id == "csi-1"
    assert len(os.listdir("/proc/self/fd")) == before


def test_what_is_not_a_fuse_descriptor_or_not_json_is_refused(node: NodeStandIn) -> None:
    node.fd_factory = lambda: os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(NodeStatusError, match="the descriptor received is not /dev/fuse"):
        nodeclient.connect(node.path, timeout=10)
    node.fd_factory = lambda: os.open("/dev/fuse", os.O_RDWR)
    node.status = b"{not json\n"
    with pytest.raises(NodeStatusError, match="malformed volume description"):
        nodeclient.connect(node.path, timeout=10)


def test_nothing_listening_is_unreachable_and_waiting_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(
        NodeUnreachableError, match=r"nothing listens on .*: is the csi\.modelcache\.io volume"
    ):
        nodeclient.connect(tmp_path / "socket", timeout=1)
    heard: list[str] = []
    started = time.monotonic()
    with pytest.raises(NodeUnreachableError):
        nodeclient.wait_reachable(tmp_path / "socket", time.monotonic() + 1.5, on_wait=heard.append)
    assert time.monotonic() - started < 5
    assert len(heard) == 1 and heard[0].startswith("waiting for the node plugin: nothing")


def _complete_later(node: NodeStandIn, **change: Any) -> threading.Timer:
    def flip() -> None:
        m = model(**change)
        node.status = volume(m)

    timer = threading.Timer(0.3, flip)
    timer.start()
    return timer


def test_wait_file_returns_once_the_node_completes_it(node: NodeStandIn) -> None:
    tracker = StatusTracker(node.path, nodeclient.read_status(node.path, 10), interval=0.05)
    tracker.wait_file("llm", "config.json", timeout=1)  # complete already: no poll
    polls = node.connections
    files = [
        {"path": "config.json", "size": 1 << 20, "complete": True},
        {"path": "model.safetensors", "size": 3 << 20, "complete": True},
    ]
    timer = _complete_later(node, state="complete", files=files)
    tracker.wait_file("llm", "model.safetensors", timeout=30)
    timer.join()
    assert node.connections > polls


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"state": "failed", "error": "HTTP 404"}, errno.EIO),
        ({}, errno.ETIMEDOUT),
    ],
)
def test_wait_file_fails_with_eio_or_times_out(
    node: NodeStandIn, change: dict[str, Any], code: int
) -> None:
    tracker = StatusTracker(node.path, nodeclient.read_status(node.path, 10), interval=0.05)
    timer = _complete_later(node, **change)
    with pytest.raises(OSError) as err:
        tracker.wait_file("llm", "model.safetensors", timeout=2)
    timer.join()
    assert err.value.errno == code
    if code == errno.EIO:
        assert "HTTP 404" in str(err.value)


def test_wait_file_ends_with_eshutdown_when_stopping(node: NodeStandIn) -> None:
    tracker = StatusTracker(node.path, nodeclient.read_status(node.path, 10), interval=0.05)
    threading.Timer(0.2, tracker.stopping.set).start()
    with pytest.raises(OSError) as err:
        tracker.wait_file("llm", "model.safetensors", timeout=30)
    assert err.value.errno == errno.ESHUTDOWN


# ---- the warm-up's verdict on a status --------------------------------------------------------


def test_the_warmup_verdict_waits_succeeds_or_names_each_failure() -> None:
    from sidecar.warmup import node_verdict

    files = [{"path": "config.json", "size": 1 << 20, "complete": True}]
    done = model(state="complete", bytes_done=1 << 20, bytes_total=1 << 20, files=files)
    assert node_verdict(parse_status(volume(model())), first_look=True, elapsed=0.1) is None
    hit = node_verdict(parse_status(volume(done)), first_look=True, elapsed=0.05)
    assert hit == (
        False,
        [
            "warmup complete: cache hit: 1 model(s), 1 file(s), 1.0 MiB already in the node "
            "cache (in 0.05s)"
        ],
    )
    waited = node_verdict(parse_status(volume(done)), first_look=False, elapsed=3)
    assert waited is not None and waited[1][0].startswith("warmup complete: 1 model(s)")
    failed = node_verdict(
        parse_status(volume(done, model("lora", state="failed", error="HTTP 403: forbidden"))),
        first_look=False,
        elapsed=1,
    )
    assert failed == (
        True,
        [
            "warmup failed: model 'lora' (hf://acme/lora@main): HTTP 403: forbidden",
            "warmup stopped: 1 of 2 model(s) could not be fetched by the node; 2.0 MiB of "
            "5.0 MiB in the node cache",
        ],
    )
