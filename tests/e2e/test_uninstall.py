"""``python -m sidecar uninstall``: the node cache and the node labels go, nothing else does.

Against the loopback Kubernetes API stand-in (through a kubeconfig, as on a workstation) and
node caches laid out the way warm-ups leave them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.agent import LABEL_PREFIX
from sidecar.uninstall import remove_node_cache
from tests.fixtures.agent_cache import write_model
from tests.fixtures.kube_nodes import FakeNodeAPI

REPO = Path(__file__).resolve().parents[2]
A, B = "hf://org/alpha", "s3://bucket/models/beta"


def uninstall(
    kube: FakeNodeAPI | None, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["PYTHONPATH"] = str(REPO)
    env["KUBECONFIG"] = (
        str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
        if kube is not None
        else str(tmp_path / "no-kubeconfig")
    )
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "uninstall", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_removes_the_cache_and_only_the_cache_labels(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    cache = tmp_path / "cache"
    a = write_model(cache, A, {"w.bin": b"a" * 1000})
    b = write_model(cache, B, {"w.bin": b"b" * 10}, complete=False, partial={"x": b"x" * 10})
    (cache / "events").mkdir()
    (cache / "events" / "1.json").write_text("{}")
    (cache / "notes.txt").write_text("an admin's file: not ours")
    labels = {
        "gpu": "a100",
        "kubernetes.io/hostname": "n1",
        LABEL_PREFIX + a.key: "ready",
        LABEL_PREFIX + "gone-123": "ready",
    }
    kube_nodes.add_node("n1", labels)
    kube_nodes.add_node("n2", {LABEL_PREFIX + b.key: "ready"})
    res = uninstall(kube_nodes, tmp_path, "--cache-dir", str(cache), "--node", "n1")
    assert res.returncode == 0, res.stderr
    assert "removed 2 model(s)" in res.stdout
    assert "node n1: removed 2 cache.modelcache.io/* label(s)" in res.stdout
    assert "not modelcache's: notes.txt" in res.stdout
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]
    assert kube_nodes.labels("n1") == {"gpu": "a100", "kubernetes.io/hostname": "n1"}
    assert kube_nodes.labels("n2") == {LABEL_PREFIX + b.key: "ready"}  # another node
    [patch] = kube_nodes.patches()
    assert patch.body == {
        "metadata": {"labels": {LABEL_PREFIX + a.key: None, LABEL_PREFIX + "gone-123": None}}
    }
    # a second run finds nothing and changes nothing
    again = uninstall(kube_nodes, tmp_path, "--cache-dir", str(cache), "--node", "n1")
    assert again.returncode == 0 and "removed 0 model(s)" in again.stdout
    assert len(kube_nodes.patches()) == 1


def test_all_nodes(tmp_path: Path, kube_nodes: FakeNodeAPI) -> None:
    kube_nodes.add_node("n1", {LABEL_PREFIX + "k1": "ready", "zone": "a"})
    kube_nodes.add_node("n2", {LABEL_PREFIX + "k2": "ready"})
    kube_nodes.add_node("n3", {"zone": "b"})
    res = uninstall(kube_nodes, tmp_path, "--all-nodes")
    assert res.returncode == 0, res.stderr
    assert kube_nodes.labels("n1") == {"zone": "a"}
    assert kube_nodes.labels("n2") == {}
    assert kube_nodes.labels("n3") == {"zone": "b"}
    assert len(kube_nodes.patches()) == 2  # none for the node without cache labels


def test_a_model_in_use_is_kept_and_named(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    busy = write_model(cache, A, {"w.bin": b"a" * 100})
    idle = write_model(cache, B, {"w.bin": b"b" * 100})
    fd = os.open(busy.model_lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a running pod's mount serves it
    try:
        res = uninstall(None, tmp_path, "--cache-dir", str(cache))
    finally:
        os.close(fd)
    assert res.returncode == 1
    assert f"1 model(s) still in use by running pods, kept: {busy.key}" in res.stderr
    assert busy.root.exists() and (busy.data / "w.bin").read_bytes() == b"a" * 100
    assert not idle.root.exists()
    # once the pod is gone
    done = remove_node_cache(cache)
    assert done.removed == [busy.key] and done.in_use == [] and not any(cache.iterdir())


def test_without_a_cluster_one_clear_line(tmp_path: Path) -> None:
    res = uninstall(None, tmp_path, "--node", "n1")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("uninstall: no cluster to talk to:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "nothing to do: give --cache-dir, --node or --all-nodes"),
        (("--node", "n1", "--all-nodes"), "--node and --all-nodes exclude each other"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    res = uninstall(None, tmp_path, *args)
    assert res.returncode == 2 and message in res.stderr


def test_hold_waits_for_sigterm_then_exits_0(tmp_path: Path) -> None:
    """The DaemonSet's main container: Ready once the init container cleaned the node."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "uninstall", "--hold"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "uninstall: holding until SIGTERM\n"
        assert proc.poll() is None  # holds: no exit of its own
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
