"""The local pod runner as the kubelet of CSI volumes, with the real node plugin.

Hand-written pods shaped like the webhook's CSI output (a ``csi.modelcache.io`` view volume,
the FUSE volume and its socket emptyDir) run on a node whose plugin is the real
``python -m sidecar csi``, against real sources: the fake Hugging Face hub (a private repo,
its token in the Secret the volume's ``nodePublishSecretRef`` names), nginx and the
fault-injecting server. Checked: what the containers see, as non-root users without
capabilities (the view's files, EROFS on every write, a read-only root filesystem, a
writable home); the kubelet's request (volume id, pod info, the Secret's data); a pod whose
``hostAliases`` point the source's host name at its own server still gets the real bytes
(only the node fetches, with the node's resolver); retries with
the kubelet's backoff while the socket emptyDir is missing or the source answers 503; a
failure with the plugin's own message for any other answer; a missing Secret named; and that
unpublish on stop leaves no mount under the node.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fixtures.modelgen import ModelInfo, generate_model, sha256_file
from tests.fixtures.nobody import open_to_others
from tests.fixtures.servers import ServerURL, fake_hf_hub, fault_server, nginx_server
from tests.localpod.csiplugin import (
    BACKOFF_INITIAL,
    Backoff,
    PodInfo,
    publish_request,
    volume_handle,
)
from tests.localpod.runner import (
    DEFAULT_UID,
    REPO_ROOT,
    LocalPod,
    Node,
    PodFailed,
    RunnerError,
    container_identity,
    mountpoints_under,
    parse_quantity,
    scratch_node,
)

HUB_TOKEN = "hf_localpod_csi_token"
SIDECAR_UID = 65532
DRIVER = "csi.modelcache.io"

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None,
    reason="the local pod runner needs root, unshare(1) and setpriv(1)",
)

# ---- the kubelet's request and the runner's rules, without a node ---------------------------


def test_volume_handle_is_the_kubelets() -> None:
    uid, name = "0b4f6a52-5b2c-4c53-9b43-5d2a7b3f1e10", "modelcache-models"
    digest = hashlib.sha256(f"{uid}{name}".encode()).hexdigest()
    assert volume_handle(uid, name) == f"csi-{digest}"


def test_publish_request_carries_the_pod_info_and_the_secrets_data(tmp_path: Path) -> None:
    pod = PodInfo("llm-0", "team-a", "0b4f6a52-5b2c-4c53-9b43-5d2a7b3f1e10", "runner")
    volume = {
        "name": "modelcache-models",
        "csi": {
            "driver": DRIVER,
            "readOnly": True,
            "volumeAttributes": {"kind": "view", "models": "m=hf://acme/x"},
            "nodePublishSecretRef": {"name": "hf-creds"},
        },
    }
    target = tmp_path / "mount"
    req = publish_request(pod, volume, target, {"hf-creds": {"token": "t0k"}, "other": {}})
    assert req.volume_id == volume_handle(pod.uid, "modelcache-models")
    assert req.target_path == str(target)
    assert req.readonly is True
    assert req.volume_capability.WhichOneof("access_type") == "mount"
    assert dict(req.secrets) == {"token": "t0k"}
    assert dict(req.volume_context) == {
        "kind": "view",
        "models": "m=hf://acme/x",
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": "llm-0",
        "csi.storage.k8s.io/pod.namespace": "team-a",
        "csi.storage.k8s.io/pod.uid": pod.uid,
        "csi.storage.k8s.io/serviceAccount.name": "runner",
    }


def test_backoff_doubles_from_500ms_up_to_its_cap() -> None:
    b = Backoff(cap=3.0)
    assert [b.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert Backoff().next_delay() == BACKOFF_INITIAL == 0.5


@pytest.mark.parametrize(
    ("pod_sc", "sc", "expected"),
    [
        ({}, {}, (DEFAULT_UID, DEFAULT_UID, ())),
        ({"runAsUser": 2000}, {}, (2000, 2000, ())),
        ({"runAsUser": 2000, "runAsGroup": 3000}, {"runAsUser": 65532}, (65532, 3000, ())),
        ({"supplementalGroups": [5, 6], "fsGroup": 7}, {"runAsGroup": 9}, (1000, 9, (5, 6, 7))),
    ],
)
def test_container_user_comes_from_its_context_then_the_pods_then_the_default(
    pod_sc: dict[str, Any], sc: dict[str, Any], expected: tuple[int, int, tuple[int, ...]]
) -> None:
    ident = container_identity({"securityContext": pod_sc}, {"name": "c", "securityContext": sc})
    assert (ident.uid, ident.gid, ident.groups) == expected
    wrapper = ident.wrapper()
    assert f"--reuid={expected[0]}" in wrapper and "--bounding-set=-all" in wrapper
    assert "--no-new-privs" in wrapper


def test_root_is_refused_unless_allowed_and_never_with_run_as_non_root() -> None:
    root = {"name": "c", "securityContext": {"runAsUser": 0}}
    with pytest.raises(RunnerError, match=r"container c: runAsUser 0: .* allow_root=True"):
        container_identity({}, root)
    assert container_identity({}, root, allow_root=True).uid == 0
    strict = {"securityContext": {"runAsNonRoot": True}}
    with pytest.raises(RunnerError, match="runAsNonRoot is true and runAsUser is 0"):
        container_identity(strict, root, allow_root=True)
    privileged = {"name": "c", "securityContext": {"privileged": True, "runAsUser": 0}}
    assert container_identity({}, privileged, allow_root=True).wrapper() == []


@pytest.mark.parametrize(
    ("value", "expected"), [("1Mi", 1 << 20), ("4Gi", 4 << 30), ("500M", 500_000_000), (42, 42)]
)
def test_parse_quantity(value: str | int, expected: int) -> None:
    assert parse_quantity(value) == expected


def test_parse_quantity_names_what_is_wrong() -> None:
    with pytest.raises(RunnerError, match="'lots' is not a Kubernetes quantity"):
        parse_quantity("lots")


# ---- pods on a node with the real plugin ------------------------------------------------------

# The reader: as the pod's user, what the view shows and what writing does, into /out.
_READER = r"""
import errno, hashlib, json, os, sys, time
root, want = sys.argv[1], int(sys.argv[2])

def walk():
    files = {}
    for d, dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, 'rb') as f:
                files[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return files

# the view shows complete files only: they may still be arriving (bounded wait)
deadline = time.monotonic() + 60
files = walk()
while len(files) < want and time.monotonic() < deadline:
    time.sleep(0.1)
    files = walk()

def try_write(p):
    try:
        with open(p, 'a') as f:
            f.write('x')
        return 0
    except OSError as e:
        return e.errno

status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
top = sorted(os.listdir(root))
mounts = {}
for line in open('/proc/self/mountinfo'):
    f = line.split()
    mounts[f[4]] = (f[f.index('-') + 1], f[5])
out = {
    'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),
    'cap_eff': status['CapEff'].strip(), 'cap_bnd': status['CapBnd'].strip(),
    'no_new_privs': status['NoNewPrivs'].strip(),
    'pod_uid': os.environ.get('POD_UID'),
    'top': top, 'files': files,
    'view_mount': mounts.get(os.path.realpath(root)),
    'writes': {
        'view': try_write(os.path.join(root, 'new-file')),
        'model': try_write(os.path.join(root, top[0], 'config.json')) if top else None,
        'root_fs': try_write('/var/tmp/localpod-csi-probe'),
        'home': try_write(os.path.expanduser('~/.cache-probe')),
        'emptydir': try_write('/out/probe'),
    },
}
tmp = '/out/result.json.tmp'
with open(tmp, 'w') as f:
    json.dump(out, f)
os.replace(tmp, '/out/result.json')
"""

_IDLE = ["python", "-c", "import signal; signal.pause()"]

# The pod's sidecar stand-in: takes the FUSE descriptor from the hand-over socket, as 65532.
_RECEIVER = r"""
import json, os, sys
from sidecar.node.handover import is_fuse_device, receive_handover
fd, info = receive_handover('/var/run/modelcache/node/socket', timeout=30)
out = {'uid': os.getuid(), 'fuse': is_fuse_device(fd), 'info': info}
with open('/out/handover.json', 'w') as f:
    json.dump(out, f)
"""

RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": SIDECAR_UID,
    "runAsGroup": SIDECAR_UID,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
    "readOnlyRootFilesystem": True,
}


def view_volume(models: str, secret: str | None = None, **extra: str) -> dict[str, Any]:
    csi: dict[str, Any] = {
        "driver": DRIVER,
        "readOnly": True,
        "volumeAttributes": {"kind": "view", "models": models, **extra},
    }
    if secret is not None:
        csi["nodePublishSecretRef"] = {"name": secret}
    return {"name": "modelcache-models", "csi": csi}


def view_pod(volume: dict[str, Any], want_files: int) -> dict[str, Any]:
    """The app reads its models through the view (in an init container, so its result is
    there when the pod is ready); a second emptyDir stands for the FUSE socket's."""
    out = {"name": "out", "mountPath": "/out"}
    return {
        "kind": "Pod",
        "metadata": {"name": "llm-0", "namespace": "team-a"},
        "spec": {
            "serviceAccountName": "llm",
            "volumes": [
                volume,
                {
                    "name": "modelcache-fuse-socket",
                    "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
                },
                {"name": "out", "emptyDir": {}},
            ],
            "initContainers": [
                {
                    "name": "reader",
                    "image": "app",
                    "command": [
                        "python",
                        "-c",
                        _READER,
                        "/var/run/modelcache/models",
                        str(want_files),
                    ],
                    "env": [
                        {
                            "name": "POD_UID",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}},
                        }
                    ],
                    "securityContext": {"readOnlyRootFilesystem": True},
                    "volumeMounts": [
                        {
                            "name": "modelcache-models",
                            "mountPath": "/var/run/modelcache/models",
                            "readOnly": True,
                        },
                        out,
                    ],
                }
            ],
            "containers": [
                {"name": "app", "image": "app", "command": _IDLE, "volumeMounts": [out]}
            ],
        },
    }


def model_files(info: ModelInfo) -> dict[str, str]:
    return {
        p.relative_to(info.root).as_posix(): sha256_file(p)
        for p in sorted(info.root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def under_top(files: dict[str, str]) -> dict[str, str]:
    """``<model dir>/<file>`` -> ``<file>`` (the view names its directory by model or key)."""
    return {k.split("/", 1)[1]: v for k, v in files.items()}


@pytest.fixture(autouse=True)
def _reachable_by_pod_users() -> Iterator[None]:
    with open_to_others(REPO_ROOT, Path(sys.prefix)):
        yield


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerURL, ModelInfo]]:
    root = tmp_path_factory.mktemp("hub")
    info = generate_model(root / "acme" / "private-llama", total_bytes=2 << 20, shards=2, seed=21)
    with fake_hf_hub(root, token=HUB_TOKEN) as server:
        yield server, info


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerURL, ModelInfo]]:
    root = tmp_path_factory.mktemp("web")
    info = generate_model(root / "public-llama", total_bytes=1 << 20, shards=1, seed=22)
    with nginx_server(root) as server:
        yield server, info


@pytest.fixture
def node(hub: tuple[ServerURL, ModelInfo]) -> Iterator[Node]:
    with scratch_node() as n:
        # the node's configuration: where the hub is (never a token of its own for pods)
        n.start_csi_plugin(env={"HF_ENDPOINT": hub[0].rstrip("/")}, check_timeout=10)
        yield n
        assert n.stop_csi_plugin() == 0, (n.root / "logs" / "csi-plugin.log").read_text()
        assert mountpoints_under(n.root) == []


def _no_mounts_left(node: Node, lp: LocalPod) -> None:
    assert mountpoints_under(node.root) == []
    assert not lp.dir.exists() and not lp.run_dir.exists()
    assert lp.log_dir.is_dir(), "container logs are kept"


@ROOT_ONLY
def test_a_non_root_app_reads_its_private_model_through_the_view(
    node: Node, hub: tuple[ServerURL, ModelInfo]
) -> None:
    _, info = hub
    volume = view_volume(
        "llama=hf://acme/private-llama", secret="hf-creds", credentialKeys="HF_TOKEN=token"
    )
    pod = view_pod(volume, want_files=len(model_files(info)))
    secrets = {"hf-creds": {"token": HUB_TOKEN}}
    with LocalPod(pod, node, secrets=secrets, ready_timeout=120) as lp:
        run = lp.run()
        target = lp.volume_path("modelcache-models")
        assert target == (
            node.kubelet_root
            / "pods"
            / lp.uid
            / "volumes/kubernetes.io~csi/modelcache-models/mount"
        )
        assert str(target) in mountpoints_under(lp.dir), "published in the runner's namespace"
        socket_dir = lp.volume_path("modelcache-fuse-socket")
        assert socket_dir.stat().st_mode & 0o777 == 0o777
        tmpfs = [
            ln
            for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if ln.split()[4] == str(socket_dir)
        ]
        assert tmpfs and " - tmpfs " in tmpfs[0] and "size=1024k" in tmpfs[0], tmpfs
        vol_data = json.loads((target.parent / "vol_data.json").read_text())
        assert vol_data["volumeHandle"] == volume_handle(lp.uid, "modelcache-models")

        seen = json.loads((lp.volume_path("out") / "result.json").read_text())
    assert seen["uid"] == seen["gid"] == DEFAULT_UID and seen["groups"] == []
    assert int(seen["cap_eff"], 16) == 0 and int(seen["cap_bnd"], 16) == 0
    assert seen["no_new_privs"] == "1"
    assert seen["pod_uid"] == lp.uid
    assert len(seen["top"]) == 1
    assert under_top(seen["files"]) == model_files(info)
    fstype, opts = seen["view_mount"]
    assert fstype == "tmpfs" and opts.startswith("ro"), seen["view_mount"]
    writes = seen["writes"]
    assert writes["view"] == errno.EROFS and writes["model"] in (errno.EROFS, errno.EACCES)
    assert writes["root_fs"] == errno.EROFS, "readOnlyRootFilesystem"
    assert writes["home"] == 0 and writes["emptydir"] == 0

    calls = [(a.call, a.volume, a.code) for a in run.csi_calls]
    assert calls[-1] == ("unpublish", "modelcache-models", "OK"), calls
    assert all(c[2] in ("OK", "ABORTED") for c in calls), calls
    _no_mounts_left(node, lp)
    assert HUB_TOKEN not in (node.root / "logs" / "csi-plugin.log").read_text()


@ROOT_ONLY
def test_publish_is_retried_until_the_socket_emptydir_exists(
    node: Node, web: tuple[ServerURL, ModelInfo]
) -> None:
    """Spec order (as the kubelet's reconciler may set volumes up): the FUSE volume comes
    before its socket's emptyDir, so the first NodePublishVolume finds no socket directory
    and is retried after 500 ms; the pod's unprivileged sidecar then gets the descriptor."""
    server, _ = web
    out = {"name": "out", "mountPath": "/out"}
    pod = {
        "kind": "Pod",
        "metadata": {"name": "llm-fuse", "namespace": "team-a"},
        "spec": {
            "volumes": [
                {
                    "name": "modelcache-fuse",
                    "csi": {
                        "driver": DRIVER,
                        "readOnly": True,
                        "volumeAttributes": {"kind": "fuse", "models": f"m={server}public-llama/"},
                    },
                },
                {
                    "name": "modelcache-fuse-socket",
                    "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
                },
                {"name": "out", "emptyDir": {}},
            ],
            "initContainers": [
                {
                    "name": "receiver",
                    "image": "sidecar",
                    "command": ["python", "-c", _RECEIVER],
                    "securityContext": RESTRICTED,
                    "volumeMounts": [
                        {"name": "modelcache-fuse-socket", "mountPath": "/var/run/modelcache/node"},
                        out,
                    ],
                }
            ],
            "containers": [
                {"name": "app", "image": "app", "command": _IDLE, "volumeMounts": [out]}
            ],
        },
    }
    with LocalPod(pod, node, empty_dirs_first=False, ready_timeout=60) as lp:
        run = lp.run()
        got = json.loads((lp.volume_path("out") / "handover.json").read_text())
        fuse = [
            ln.split(" - ")[1].split()[0]
            for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if ln.split()[4] == str(lp.volume_path("modelcache-fuse"))
        ]
        assert fuse == ["fuse.modelcache"], fuse
    first, second = run.csi_calls[0], run.csi_calls[1]
    assert (first.call, first.volume, first.code) == ("publish", "modelcache-fuse", "ABORTED")
    assert "modelcache-fuse-socket" in first.message
    assert (second.call, second.code) == ("publish", "OK")
    assert second.at - first.at >= 0.5, "the kubelet's first backoff is 500 ms"
    assert got["uid"] == SIDECAR_UID and got["fuse"] is True
    assert got["info"]["volume_id"] == volume_handle(lp.uid, "modelcache-fuse")
    assert [(a.call, a.code) for a in run.csi_calls[2:]] == [("unpublish", "OK")]
    _no_mounts_left(node, lp)


@ROOT_ONLY
def test_a_source_that_answers_503_is_retried_with_backoff_until_it_recovers(
    node: Node, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("flaky")
    info = generate_model(root / "flaky-llama", total_bytes=1 << 20, shards=1, seed=23)
    with fault_server(root) as server:
        server.faults.status_all = 503
        retries: list[str] = []

        def progress(msg: str) -> None:
            # the source comes back once the runner has retried twice (no timing guesses)
            if "NodePublishVolume" in msg:
                retries.append(msg)
                if len(retries) == 2:
                    server.faults.status_all = 0

        pod = view_pod(view_volume(f"flaky={server}flaky-llama/"), len(model_files(info)))
        with LocalPod(pod, node, progress=progress, ready_timeout=120) as lp:
            run = lp.run()
            seen = json.loads((lp.volume_path("out") / "result.json").read_text())
    assert under_top(seen["files"]) == model_files(info)
    failed = [a for a in run.csi_calls if a.call == "publish" and a.code != "OK"]
    assert [a.code for a in failed[:2]] == ["UNAVAILABLE", "UNAVAILABLE"], failed
    assert "the source is unreachable" in failed[0].message
    published = [a for a in run.csi_calls if a.call == "publish"]
    gaps = [b.at - a.at for a, b in itertools.pairwise(published)]
    # 0.5 s, then 1 s (plus the call itself): the kubelet's doubling backoff
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps
    _no_mounts_left(node, lp)


_RESOLVE = r"""
import json, socket, sys
with open('/out/resolved.json', 'w') as f:
    json.dump({'host': sys.argv[1], 'ip': socket.gethostbyname(sys.argv[1])}, f)
"""


@ROOT_ONLY
def test_host_aliases_of_a_pod_never_steer_the_fill_of_the_node_cache(
    node: Node, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The attack of old: a pod's ``hostAliases`` point the mirror's host name at the
    pod's own server. The pod itself resolves the name to that server; the model it is
    published comes from the real mirror all the same (only the node plugin fetches, with
    the node's resolver), and the impostor is never asked."""
    host = socket.gethostname()  # the node resolves it to 127.0.0.1 (its /etc/hosts)
    if socket.gethostbyname(host) != "127.0.0.1":
        pytest.skip(f"this machine resolves its name {host!r} to {socket.gethostbyname(host)}")
    root = tmp_path_factory.mktemp("mirror")
    info = generate_model(root / "shared-llama", total_bytes=1 << 20, shards=1, seed=24)
    with fault_server(root) as mirror:
        port = int(mirror.rstrip("/").rsplit(":", 1)[1])
        asked: list[str] = []

        class Impostor(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                asked.append(self.path)
                self.send_error(500, "the impostor's answer")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        impostor = ThreadingHTTPServer(("127.0.0.2", port), Impostor)
        thread = threading.Thread(target=impostor.serve_forever, daemon=True)
        thread.start()
        try:
            pod = view_pod(
                view_volume(f"shared=http://{host}:{port}/shared-llama/"),
                len(model_files(info)),
            )
            pod["spec"]["hostAliases"] = [{"ip": "127.0.0.2", "hostnames": [host]}]
            pod["spec"]["initContainers"].insert(
                0,
                {
                    "name": "resolver",
                    "image": "app",
                    "command": ["python", "-c", _RESOLVE, host],
                    "volumeMounts": [{"name": "out", "mountPath": "/out"}],
                },
            )
            with LocalPod(pod, node, ready_timeout=120) as lp:
                lp.run()
                resolved = json.loads((lp.volume_path("out") / "resolved.json").read_text())
                seen = json.loads((lp.volume_path("out") / "result.json").read_text())
        finally:
            impostor.shutdown()
            impostor.server_close()
            thread.join(timeout=10)
    assert resolved == {"host": host, "ip": "127.0.0.2"}, "the pod's own resolution"
    assert under_top(seen["files"]) == model_files(info), "the real mirror's bytes"
    assert asked == [], "the impostor was asked"
    _no_mounts_left(node, lp)


@ROOT_ONLY
def test_a_refused_publish_fails_the_pod_with_the_plugins_message(
    node: Node, hub: tuple[ServerURL, ModelInfo]
) -> None:
    volume = view_volume("llama=hf://acme/private-llama", secret="hf-creds")
    pod = view_pod(volume, want_files=1)
    with LocalPod(pod, node, secrets={"hf-creds": {"HF_TOKEN": "hf_guess"}}) as lp:
        with pytest.raises(PodFailed) as err:
            lp.run()
        assert lp.run_info.containers == [], "no container starts without its volumes"
    message = str(err.value)
    assert 'MountVolume.SetUp failed for volume "modelcache-models"' in message
    assert "code = PermissionDenied" in message
    assert "pod team-a/llm-0 may not read model 'llama'" in message, message
    assert [a.code for a in lp.run_info.csi_calls] == ["PERMISSION_DENIED", "OK"]
    _no_mounts_left(node, lp)


@ROOT_ONLY
def test_a_missing_node_publish_secret_fails_the_pod_naming_it(node: Node) -> None:
    pod = view_pod(view_volume("llama=hf://acme/private-llama", secret="hf-creds"), 1)
    with LocalPod(pod, node, secrets={"other": {"token": "x"}}) as lp:
        with pytest.raises(PodFailed, match="fetching NodePublishSecretRef team-a/hf-creds failed"):
            lp.run()
        assert lp.run_info.csi_calls == [], "the plugin is never called"
        assert lp.run_info.containers == []
    _no_mounts_left(node, lp)


@ROOT_ONLY
def test_a_csi_volume_of_a_driver_the_node_lacks_fails_like_the_kubelet() -> None:
    with scratch_node() as bare:
        pod = view_pod(view_volume("m=hf://acme/x"), 1)
        with (
            LocalPod(pod, bare) as lp,
            pytest.raises(PodFailed, match=f"driver name {DRIVER} not found"),
        ):
            lp.run()
        assert mountpoints_under(bare.root) == []


@ROOT_ONLY
def test_root_containers_are_refused_before_anything_starts(node: Node) -> None:
    pod = view_pod(view_volume("m=hf://acme/x"), 1)
    pod["spec"]["containers"][0]["securityContext"] = {"runAsUser": 0}
    with LocalPod(pod, node) as lp, pytest.raises(RunnerError, match="container app: runAsUser 0"):
        lp.run()
    assert lp.run_info.csi_calls == []


def test_grpc_codes_the_runner_retries_are_the_kubelets_transient_ones() -> None:
    from tests.localpod.csiplugin import RETRYABLE

    assert {c.name for c in RETRYABLE} == {
        "ABORTED",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
    }
    assert grpc.StatusCode.PERMISSION_DENIED not in RETRYABLE
