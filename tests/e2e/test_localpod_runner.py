"""The local pod runner itself, on hand-written pods that need nothing but sh and mount.

These pin down the kubelet behaviour the demo and the cold-start benchmark rely on: init
order, native sidecar startupProbe, env from secrets and ``$(VAR)`` expansion, readOnly, and
mount propagation (a mount made by a ``Bidirectional`` sidecar reaches a ``HostToContainer``
app container), and that nothing (mount, process, created directory) survives the pod.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.modelgen import generate_model
from tests.fixtures.nobody import open_to_others
from tests.localpod.mirror import Mirror, NicLimit, publish_hub_repo
from tests.localpod.runner import (
    HOST_MOUNTPOINTS,
    NODE_MARKER_ENV,
    REPO_ROOT,
    LocalPod,
    Node,
    PodFailed,
    RunnerError,
    clean_leftovers,
    expand_vars,
    mountpoints_under,
    pod_from_manifest,
    scratch_node,
)
from tests.localpod.standin import UsageError, parse_server_args

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="the local pod runner needs root and unshare(1) for mount namespaces",
)
BASE = "/localpod-runner-test"  # mountpoints created on the host, removed by the runner


@pytest.fixture(autouse=True)
def _reachable_by_pod_users() -> Iterator[None]:
    """The containers run as non-root users: they must reach the checkout and the virtual
    environment (the node is a ``scratch_node``, reachable already)."""
    with open_to_others(REPO_ROOT, Path(sys.prefix)):
        yield


@pytest.fixture
def node() -> Iterator[Node]:
    with scratch_node() as n:
        yield n


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$(A)-$(B)", "1-two"),
        ("$$(A)", "$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("cost $5", "cost $5"),
        ("", ""),
    ],
)
def test_expand_vars_like_kubelet(value: str, expected: str) -> None:
    assert expand_vars(value, {"A": "1", "B": "two"}) == expected


def test_pod_from_deployment_keeps_template_spec() -> None:
    dep = {
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "ml"},
        "spec": {"template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}},
    }
    pod = pod_from_manifest([{"kind": "Service"}, dep])
    assert pod["metadata"] == {"labels": {"a": "b"}, "name": "web", "namespace": "ml"}
    assert pod["spec"] == {"containers": []}
    with pytest.raises(RunnerError, match="no Pod"):
        pod_from_manifest({"kind": "ConfigMap"})


@pytest.mark.parametrize(
    ("framework", "argv", "model", "served", "port"),
    [
        (
            "vllm",
            ["serve", "/models/m", "--served-model-name", "org/m"],
            "/models/m",
            "org/m",
            8000,
        ),
        ("vllm", ["serve", "--model=/x", "--port", "9"], "/x", "/x", 9),
        ("sglang", ["--model-path", "/m", "--port=7"], "/m", "/m", 7),
        ("llama", ["-m", "/m/a.gguf", "--alias", "a"], "/m/a.gguf", "a", 8080),
        ("tgi", ["--model-id", "/m"], "/m", "/m", 80),
    ],
)
def test_standin_reads_framework_args(
    framework: str, argv: list[str], model: str, served: str, port: int
) -> None:
    args = parse_server_args(framework, argv)
    assert (args.model, args.served_name, args.port) == (model, served, port)


def test_standin_refuses_missing_model() -> None:
    with pytest.raises(UsageError, match="no model"):
        parse_server_args("vllm", ["serve", "--port", "8000"])


def payload_bytes(model: Path) -> int:
    """What a loader reads: tensor data of every shard plus every other file whole."""
    total = 0
    for p in model.rglob("*"):
        if p.is_file():
            total += p.stat().st_size
            if p.suffix == ".safetensors":
                with open(p, "rb") as f:
                    total -= 8 + struct.unpack("<Q", f.read(8))[0]
    return total


def _pod(secret_env: bool = True, fail_init: bool = False) -> dict[str, Any]:
    sidecar_script = (
        f"mount -t tmpfs localpod-fake {BASE}/shared && mkdir {BASE}/shared/m && "
        f"cp -r {BASE}/src/. {BASE}/shared/m/ && touch {BASE}/shared/.ready; "
        f"trap 'umount {BASE}/shared; exit 0' TERM; sleep infinity & wait $!"
    )
    env: list[dict[str, Any]] = [{"name": "SERVED", "value": "org/model"}]
    if secret_env:
        env.append(
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}
        )
    return {
        "kind": "Pod",
        "metadata": {"name": "runner-test"},
        "spec": {
            "volumes": [
                {"name": "src", "hostPath": {"path": "/srv/model", "type": "Directory"}},
                {"name": "shared", "emptyDir": {}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "initContainers": [
                {
                    "name": "prep",
                    "image": "busybox",
                    "command": ["sh", "-c", f"echo $(TOKEN) > {BASE}/scratch/hello; exit $(CODE)"],
                    "env": [*env, {"name": "CODE", "value": "3" if fail_init else "0"}],
                    "volumeMounts": [{"name": "scratch", "mountPath": f"{BASE}/scratch"}],
                },
                {
                    "name": "fake-sidecar",
                    "image": "busybox",
                    "restartPolicy": "Always",
                    "securityContext": {"privileged": True, "runAsUser": 0},
                    "command": ["sh", "-c", sidecar_script],
                    "startupProbe": {
                        "exec": {"command": ["test", "-f", f"{BASE}/shared/.ready"]},
                        "periodSeconds": 1,
                        "failureThreshold": 30,
                    },
                    "volumeMounts": [
                        {
                            "name": "shared",
                            "mountPath": f"{BASE}/shared",
                            "mountPropagation": "Bidirectional",
                        },
                        {"name": "src", "mountPath": f"{BASE}/src", "readOnly": True},
                    ],
                },
            ],
            "containers": [
                {
                    "name": "app",
                    "image": "vllm/vllm-openai:latest",
                    "args": ["/models/m", "--served-model-name", "$(SERVED)"],
                    "env": env,
                    "lifecycle": {
                        "postStart": {
                            "exec": {
                                # proves readOnly: writing into the mount must fail
                                "command": ["sh", "-c", "! touch /models/m/written 2>/dev/null"]
                            }
                        }
                    },
                    "volumeMounts": [
                        {
                            "name": "shared",
                            "mountPath": "/models",
                            "readOnly": True,
                            "mountPropagation": "HostToContainer",
                        },
                        {"name": "scratch", "mountPath": f"{BASE}/scratch"},
                    ],
                }
            ],
        },
    }


@ROOT_ONLY
def test_runner_propagates_sidecar_mount_to_app_and_cleans_up(node: Node) -> None:
    generate_model(node.host_path("/srv/model"), total_bytes=6 << 20, shards=2)
    for p in node.host_path("/srv/model").iterdir():
        p.chmod(0o644)  # the app runs as uid 1000: the image's model files are world-readable
    model_bytes = payload_bytes(node.host_path("/srv/model"))
    lp = LocalPod(_pod(), node, secrets={"creds": {"token": "s3cret"}}, allow_root=True)
    try:
        run = lp.run()
        assert run.served_models == ["org/model"]
        assert run.time_to_ready is not None and run.time_to_ready > 0
        assert [c.name for c in run.containers] == ["prep", "fake-sidecar", "app"]
        assert run.container("prep").exit_code == 0
        app_log = run.container("app").log.read_text()
        # every byte of the model was read through the tmpfs the sidecar mounted
        assert f"{model_bytes} bytes" in app_log, app_log
        assert (lp.volume_path("scratch") / "hello").read_text() == "s3cret\n"
        pids = [c.pid for c in run.containers if c.kind != "init"]
        assert mountpoints_under(node.root), "the sidecar's tmpfs should be visible on the host"
    finally:
        lp.stop()
    assert mountpoints_under(node.root) == []
    if not HOST_MOUNTPOINTS.others_running():
        assert not Path(BASE).exists()
    for pid in pids:
        assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert run.container("fake-sidecar").exit_code == 0  # it got SIGTERM and unmounted


@ROOT_ONLY
def test_failed_init_container_fails_the_pod_and_leaves_nothing(node: Node) -> None:
    generate_model(node.host_path("/srv/model"), total_bytes=2 << 20, shards=1)
    pod = _pod(fail_init=True)
    with LocalPod(pod, node, secrets={"creds": {"token": "x"}}, allow_root=True) as lp:
        with pytest.raises(PodFailed, match="init container prep exited 3"):
            lp.run()
        assert lp.run_info.failed is not None
        assert [c.name for c in lp.run_info.containers] == ["prep"]
    assert mountpoints_under(node.root) == []
    if not HOST_MOUNTPOINTS.others_running():
        assert not Path(BASE).exists()


@ROOT_ONLY
def test_missing_secret_is_a_clear_error(node: Node) -> None:
    generate_model(node.host_path("/srv/model"), total_bytes=2 << 20, shards=1)
    with (
        LocalPod(_pod(), node, allow_root=True) as lp,
        pytest.raises(RunnerError, match="creds/token"),
    ):
        lp.run()
    assert mountpoints_under(node.root) == []


@ROOT_ONLY
def test_clean_leftovers_kills_only_container_processes(tmp_path: Path) -> None:
    """After a runner was killed: its host binds and its containers' processes go; every
    other process stays: one of this mount namespace, and one in a namespace of its own
    that merely copied the node's mounts (created by someone else while a pod ran)."""
    node_root = tmp_path / "node"
    empty = node_root / "kubelet" / "pods" / "p" / "volumes" / "v"
    empty.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(empty), str(empty)], check=True)
    target = tmp_path / "target"
    target.mkdir()

    def in_own_namespace(marker: bool) -> subprocess.Popen[bytes]:
        env = {"PATH": os.environ["PATH"]}
        if marker:
            env[NODE_MARKER_ENV] = os.path.realpath(node_root)
        return subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                f"mount --bind {empty} {target} && exec sleep 120",
            ],
            env=env,
        )

    container = in_own_namespace(marker=True)
    foreign = in_own_namespace(marker=False)  # same mounts, someone else's process
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        deadline = time.monotonic() + 10
        for p in (container, foreign):
            while str(target) not in Path(f"/proc/{p.pid}/mountinfo").read_text():
                assert time.monotonic() < deadline, "the namespace never mounted"
                assert p.poll() is None
                time.sleep(0.02)
        done = clean_leftovers(node_root)
        assert f"process {container.pid}" in done
        assert container.wait(timeout=10) == -9
        assert foreign.poll() is None and bystander.poll() is None
        assert not any(f"process {p.pid}" in done for p in (foreign, bystander))
        assert mountpoints_under(node_root) == []
    finally:
        for p in (container, foreign, bystander):
            p.kill()
            p.wait()
        subprocess.run(["umount", "-l", str(empty)], capture_output=True, check=False)


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="no nginx (nginx-light)")
def test_nic_limit_relays_bytes_intact_and_shares_one_budget(tmp_path: Path) -> None:
    import threading
    import urllib.request

    root = tmp_path / "root"
    root.mkdir()
    blobs = {f"f{i}": os.urandom(1 << 20) for i in range(2)}
    for name, data in blobs.items():
        (root / name).write_bytes(data)
    rate = 4 << 20  # 4 MiB/s shared by both streams: 2 MiB take >= 0.5 s in total
    got: dict[str, str] = {}
    with Mirror(root) as mirror, NicLimit(mirror.port, rate) as nic:

        def fetch(name: str) -> None:
            with urllib.request.urlopen(nic.url + name, timeout=30) as resp:
                got[name] = hashlib.sha256(resp.read()).hexdigest()

        t0 = time.monotonic()
        threads = [threading.Thread(target=fetch, args=(n,)) for n in blobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
    assert got == {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}
    # a lower bound only (slowness cannot fail it): the two streams shared one budget
    assert elapsed >= 2 * (1 << 20) / rate * 0.9, elapsed


def _classic_pod(hook: str) -> dict[str, Any]:
    """Two regular containers, the first with a postStart hook (the classic sidecar's
    shape): ``first`` becomes up half a second after it starts, ``second`` records whether
    it found ``first`` up when it started."""
    scratch = {"name": "scratch", "mountPath": f"{BASE}/scratch"}
    return {
        "kind": "Pod",
        "metadata": {"name": "classic-test"},
        "spec": {
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [
                {
                    "name": "first",
                    "image": "busybox",
                    "command": [
                        "sh",
                        "-c",
                        f"sleep 0.5; touch {BASE}/scratch/up; exec sleep infinity",
                    ],
                    "lifecycle": {"postStart": {"exec": {"command": ["sh", "-c", hook]}}},
                    "volumeMounts": [scratch],
                },
                {
                    "name": "second",
                    "image": "busybox",
                    "command": [
                        "sh",
                        "-c",
                        f"if [ -f {BASE}/scratch/up ]; then r=up; else r=down; fi; "
                        f"echo $r > {BASE}/scratch/seen; exec sleep infinity",
                    ],
                    "volumeMounts": [scratch],
                },
            ],
        },
    }


@ROOT_ONLY
def test_post_start_hook_holds_back_the_next_container(node: Node) -> None:
    wait_up = f"while [ ! -f {BASE}/scratch/up ]; do sleep 0.05; done"
    with LocalPod(_classic_pod(wait_up), node, ready_timeout=60) as lp:
        run = lp.run()
        first, second = run.container("first"), run.container("second")
        assert first.hook_ok is not None and second.started is not None
        assert first.hook_ok <= second.started
        seen = lp.volume_path("scratch") / "seen"
        deadline = time.monotonic() + 30
        while not (seen.exists() and seen.read_text().strip()):
            assert time.monotonic() < deadline, "the second container never ran"
            time.sleep(0.02)
        assert seen.read_text().strip() == "up"
    assert mountpoints_under(node.root) == []


@ROOT_ONLY
def test_failed_post_start_kills_the_container_and_fails_the_pod(node: Node) -> None:
    with LocalPod(_classic_pod("echo not ready; exit 4"), node, ready_timeout=60) as lp:
        with pytest.raises(PodFailed, match="postStart hook of first exited 4: container killed"):
            lp.run()
        first = lp.run_info.container("first")
        assert first.exit_code is not None and first.exit_code != 0  # killed, not exited
        assert first.pid is not None and not Path(f"/proc/{first.pid}").exists()
        assert [c.name for c in lp.run_info.containers] == ["first"], "second never starts"
        assert "not ready" in first.log.read_text()
    assert mountpoints_under(node.root) == []


def test_generate_model_reuse_skips_only_an_identical_model(tmp_path: Path) -> None:
    """The benchmark's multi-GiB model is kept between runs, but never a stale one."""
    dest = tmp_path / "m"
    first = generate_model(dest, total_bytes=1 << 20, shards=2, seed=5, reuse=True)
    for p in dest.iterdir():
        os.utime(p, (1_000_000, 1_000_000))  # a rewritten file would get a new mtime
    again = generate_model(dest, total_bytes=1 << 20, shards=2, seed=5, reuse=True)
    assert again.files == first.files
    assert {p.stat().st_mtime for p in dest.iterdir()} == {1_000_000}, "rewritten"
    other = generate_model(dest, total_bytes=1 << 20, shards=2, seed=6, reuse=True)
    assert other.files.keys() == first.files.keys() and other.files != first.files
    (dest / other.weight_files[0]).unlink()
    healed = generate_model(dest, total_bytes=1 << 20, shards=2, seed=6, reuse=True)
    assert healed.files == other.files
    assert sorted(p.name for p in dest.iterdir()) == sorted(other.files)


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="no nginx (nginx-light)")
def test_mirror_answers_the_hub_endpoints_and_counts_bytes_by_path(tmp_path: Path) -> None:
    import json
    import urllib.request

    model = generate_model(tmp_path / "model", total_bytes=1 << 20, shards=2)
    store = tmp_path / "store"
    commit = publish_hub_repo(store, "org/tiny", model)
    with Mirror(store) as mirror:
        with urllib.request.urlopen(mirror.url + "api/models/org/tiny/revision/main") as resp:
            assert resp.headers["Content-Type"] == "application/json"
            info = json.load(resp)
        assert info["sha"] == commit
        lfs = {s["rfilename"]: s["lfs"]["sha256"] for s in info["siblings"] if "lfs" in s}
        assert lfs == {w: model.files[w].sha256 for w in model.weight_files}
        assert mirror.bytes_sent("/resolve/") == 0
        weight = model.weight_files[0]
        with urllib.request.urlopen(f"{mirror.url}org/tiny/resolve/{commit}/{weight}") as resp:
            body = resp.read()
        assert hashlib.sha256(body).hexdigest() == model.files[weight].sha256
        assert mirror.bytes_sent("/resolve/") == len(body)
        assert mirror.bytes_sent() > len(body), "model info counts among all bytes"
