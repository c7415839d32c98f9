"""The csi.modelcache.io node plugin, called over gRPC the way the kubelet calls it.

The plugin runs as ``python -m sidecar csi`` in a private mount namespace of its own
(``unshare --mount``), so its real mounts never reach the host and vanish with it. The test
is the kubelet: it lays out ``<kubelet-root>/pods/<uid>/volumes/...`` as the kubelet does,
sends NodePublishVolume with the volume context the kubelet builds for an inline volume of a
CSIDriver with ``podInfoOnMount`` and the data of the pod's ``nodePublishSecretRef``, retries
on the retryable codes, and looks at the result from inside the plugin's mount namespace as
the pod would (``nsenter``, and ``setpriv`` to uid 65534 with no capabilities).

Sources are real: nginx, the fake Hugging Face hub (a private repo with a bearer token) and
the fault-injecting server for a slow or failing fetch. A view is published at once and
its files appear as they complete; the status line every hand-over connection carries goes
from ``fetching`` to ``complete`` (or ``failed`` with the source's error).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.modelsource import parse_model_uri
from sidecar.node import _csi_pb2 as pb
from sidecar.node import _csi_pb2_grpc as pb_grpc
from sidecar.node.handover import HandoverError, is_fuse_device, read_status, receive_fd
from tests.fixtures.modelgen import ModelInfo, generate_model, sha256_file
from tests.fixtures.nobody import open_to_others
from tests.fixtures.servers import ServedModel, fake_hf_hub, fault_server, free_port

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
RETRYABLE = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
HUB_TOKEN = "hf_csi_token"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the node plugin mounts: needs root"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool}(1) is not installed (util-linux)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(autouse=True)
def _checkout_reachable_by_nobody() -> Iterator[None]:
    """The uid 65534 processes import this checkout's code with its virtual environment."""
    with open_to_others(REPO, Path(sys.prefix)):
        yield


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str = "team-a"
    uid: str = ""
    service_account: str = "default"

    @staticmethod
    def new(name: str, namespace: str = "team-a") -> Pod:
        return Pod(name, namespace, str(uuid.uuid4()))


def as_nobody(argv: list[str]) -> list[str]:
    """``argv`` as uid/gid 65534 with no capabilities at all, like a restricted pod."""
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        *argv,
    ]


class Plugin:
    """``python -m sidecar csi`` in its own mount namespace, plus a kubelet's client."""

    def __init__(
        self,
        root: Path,
        *,
        file_roots: tuple[Path, ...] = (),
        env: Mapping[str, str],
        cache_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.root = root
        self.kubelet_root = root / "kubelet"
        self.cache_dir = cache_dir or root / "cache"
        self.socket = root / "csi.sock"
        self.log_path = root / "plugin.log"
        self.kubelet_root.mkdir(mode=0o755)
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-m",
            "sidecar",
            "csi",
            f"--csi-endpoint=unix://{self.socket}",
            f"--cache-dir={self.cache_dir}",
            f"--kubelet-root={self.kubelet_root}",
            "--check-timeout=20",
            "--fetch-retry=1",
            *(f"--file-root={r}" for r in file_roots),
            *extra_args,
        ]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "NODE_NAME": "node-a", **env}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO
        )
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=60)
        except grpc.FutureTimeoutError:
            self.stop()
            raise AssertionError(f"the plugin did not start:\n{self.log()}") from None
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.node = pb_grpc.NodeStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()

    # ---- the kubelet's side ---------------------------------------------------------------

    def pod_dir(self, pod: Pod) -> Path:
        return self.kubelet_root / "pods" / pod.uid

    def target(self, pod: Pod, volume: str) -> Path:
        return self.pod_dir(pod) / "volumes" / "kubernetes.io~csi" / volume / "mount"

    def socket_dir(self, pod: Pod) -> Path:
        return self.pod_dir(pod) / "volumes" / "kubernetes.io~empty-dir" / "modelcache-fuse-socket"

    def make_socket_volume(self, pod: Pod) -> Path:
        """The pod's emptyDir for the hand-over socket, as the kubelet makes it (0777)."""
        d = self.socket_dir(pod)
        d.mkdir(parents=True)
        d.chmod(0o777)
        for p in (d.parent, d.parent.parent, self.pod_dir(pod), self.pod_dir(pod).parent):
            p.chmod(0o755)
        return d

    def request(
        self,
        pod: Pod,
        volume: str,
        attributes: Mapping[str, str],
        secrets: Mapping[str, str] | None = None,
    ) -> pb.NodePublishVolumeRequest:
        """What the kubelet sends for an inline volume of a podInfoOnMount driver."""
        target = self.target(pod, volume)
        # the kubelet creates the volume's directory (with its vol_data.json), not the target
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / "vol_data.json").write_text(
            json.dumps({"driverName": "csi.modelcache.io", "volumeLifecycleMode": "Ephemeral"})
        )
        context = {
            **attributes,
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
            "csi.storage.k8s.io/ephemeral": "true",
        }
        handle = "csi-" + hashlib.sha256(f"{pod.uid}{volume}".encode()).hexdigest()
        return pb.NodePublishVolumeRequest(
            volume_id=handle,
            target_path=str(target),
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(),
                access_mode=pb.VolumeCapability.AccessMode(
                    mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            ),
            readonly=True,
            secrets=dict(secrets or {}),
            volume_context=context,
        )

    def publish_once(self, req: pb.NodePublishVolumeRequest) -> None:
        self.node.NodePublishVolume(req, timeout=120)

    def publish(
        self, req: pb.NodePublishVolumeRequest, *, deadline: float = 120.0
    ) -> list[grpc.RpcError]:
        """Call until it succeeds, retrying the retryable codes like the kubelet; returns
        the retryable errors seen on the way."""
        seen: list[grpc.RpcError] = []
        end = time.monotonic() + deadline
        delay = 0.05
        while True:
            try:
                self.publish_once(req)
                return seen
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > end:
                    raise
                seen.append(exc)
            time.sleep(delay)  # the kubelet's backoff between retries, bounded by `end`
            delay = min(delay * 2, 0.5)

    def unpublish(self, req: pb.NodePublishVolumeRequest) -> None:
        self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=req.volume_id, target_path=req.target_path),
            timeout=60,
        )

    # ---- looking from inside the plugin's mount namespace ---------------------------------

    def run_in_ns(
        self, argv: list[str], *, nobody: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", f"--target={self.proc.pid}", "--mount", "--"]
        cmd += as_nobody(argv) if nobody else argv
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def py_in_ns(self, code: str, *args: str, nobody: bool = False) -> str:
        proc = self.run_in_ns([sys.executable, "-I", "-c", code, *args], nobody=nobody)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def mounts_in_ns(self) -> list[tuple[str, str, str]]:
        """(mount point, fs type, mount options) in the plugin's namespace."""
        out = []
        text = Path(f"/proc/{self.proc.pid}/mountinfo").read_text()
        for line in text.splitlines():
            fields = line.split()
            sep = fields.index("-")
            out.append((fields[4], fields[sep + 1], fields[5]))
        return out


# a pod's look at its view: every file with its sha256, and what writing does
_WALK = """
import hashlib, json, os, sys
root = sys.argv[1]
files = {}
for d, dirs, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n)
        files[os.path.relpath(p, root)] = hashlib.sha256(open(p, 'rb').read()).hexdigest()
writes = {}
for p in (os.path.join(root, 'new-file'), os.path.join(root, sys.argv[2], 'config.json'),
          os.path.join(root, sys.argv[2], 'new-file')):
    try:
        with open(p, 'a') as f:
            f.write('x')
        writes[p] = 0
    except OSError as e:
        writes[p] = e.errno
try:
    os.mkdir(os.path.join(root, sys.argv[2], 'dir'))
    writes['mkdir'] = 0
except OSError as e:
    writes['mkdir'] = e.errno
print(json.dumps({'top': sorted(os.listdir(root)), 'files': files, 'writes': writes}))
"""


def expected_files(info: ModelInfo, name: str) -> dict[str, str]:
    return {
        f"{name}/{p.relative_to(info.root).as_posix()}": sha256_file(p)
        for p in sorted(info.root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def key_of(uri: str) -> str:
    """The directory a view shows a model in: its cache key."""
    return parse_model_uri(uri).cache_key


def wait_for_view(
    plugin: Plugin, req: pb.NodePublishVolumeRequest, key: str, info: ModelInfo
) -> tuple[dict[str, object], list[set[str]]]:
    """Look at the view as the pod's user until every file of the model is there; returns
    the last look and the file sets seen on the way. Every look must show only complete,
    correct files (``data/`` never holds a partial one)."""
    expected = expected_files(info, key)
    seen: list[set[str]] = []
    end = time.monotonic() + 120
    while True:
        look = json.loads(plugin.py_in_ns(_WALK, req.target_path, key, nobody=True))
        files: dict[str, str] = look["files"]
        wrong = {p for p, h in files.items() if expected.get(p) != h}
        assert not wrong, f"the view shows files that are not complete and correct: {wrong}"
        seen.append(set(files))
        if files == expected:
            return look, seen
        assert time.monotonic() < end, f"the view never completed: {sorted(files)}"
        time.sleep(0.1)  # polling the view, bounded by `end`


def wait_for_status(
    socket_path: Path, done: str = "complete", deadline: float = 120
) -> list[dict[str, Any]]:
    """The status line read about ten times a second until every model is ``done`` (or
    one failed); every status read on the way, in order."""
    seen: list[dict[str, Any]] = []
    end = time.monotonic() + deadline
    while True:
        status = read_status(socket_path, timeout=10)
        seen.append(status)
        states = {m["state"] for m in status["models"]}
        if states == {done} or "failed" in states:
            return seen
        assert time.monotonic() < end, f"still {states} after {deadline}s"
        time.sleep(0.1)  # polling like the warm-up does, bounded by `end`


def hub_commit(served: ServedModel, revision: str = "main") -> str:
    """What the fake hub says ``revision`` of the model is (its model info's ``sha``)."""
    repo = served.url.removeprefix("hf://")
    url = f"{served.server.rstrip('/')}/api/models/{repo}/revision/{revision}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {HUB_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        commit: str = json.load(resp)["sha"]
    return commit


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServedModel]]:
    """Two http models (behind the fault server, no faults unless a test sets them) and a
    private hub model that needs HUB_TOKEN."""
    web_root = tmp_path_factory.mktemp("web")
    hub_root = tmp_path_factory.mktemp("hub")
    small = generate_model(web_root / "small-llama", total_bytes=2 << 20, shards=2, seed=11)
    other = generate_model(web_root / "other-llama", total_bytes=1 << 20, shards=1, seed=12)
    private = generate_model(hub_root / "acme" / "secret-llama", total_bytes=1 << 20, shards=1)
    with fault_server(web_root) as web, fake_hf_hub(hub_root, token=HUB_TOKEN) as hub:
        yield {
            "small": ServedModel(f"{web}small-llama/", web, small),
            "other": ServedModel(f"{web}other-llama/", web, other),
            "private": ServedModel("hf://acme/secret-llama", hub, private),
        }


@pytest.fixture
def plugin_root() -> Iterator[Path]:
    # not pytest's tmp_path: its parents are 0700, and the pod's user (65534) must reach
    # the hand-over socket and the fixtures it serves, as on a node
    root = Path(tempfile.mkdtemp(prefix="modelcache-csi-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def plugin(plugin_root: Path, served: dict[str, ServedModel]) -> Iterator[Plugin]:
    allowed = plugin_root / "allowed"
    allowed.mkdir()
    env = {
        # the node's configuration: where the hub is ...
        "HF_ENDPOINT": served["private"].server.rstrip("/"),
        # ... and a valid token of the node's own, which must never be lent to a pod
        "HF_TOKEN": HUB_TOKEN,
    }
    p = Plugin(plugin_root, file_roots=(allowed,), env=env)
    yield p
    p.stop()
    assert "Traceback" not in p.log(), p.log()
    assert p.proc.returncode == 0, p.log()  # SIGTERM: stops serving and exits cleanly


def models_attr(**models: str) -> dict[str, str]:
    return {"models": ",".join(f"{k}={v}" for k, v in models.items()), "kind": "view"}


# ---- identity and node info -------------------------------------------------------------------


def test_identity_and_node_info_are_what_the_registrar_and_kubelet_read(plugin: Plugin) -> None:
    info = plugin.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
    assert info.name == "csi.modelcache.io"
    assert info.vendor_version
    assert plugin.identity.Probe(pb.ProbeRequest(), timeout=10).ready.value is True
    caps = plugin.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10)
    assert list(caps.capabilities) == []  # no controller service
    node_caps = plugin.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=10)
    assert list(node_caps.capabilities) == []  # no staging: the kubelet only publishes
    assert plugin.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10).node_id == "node-a"


# ---- view ---------------------------------------------------------------------------------------


def test_view_holds_the_pods_models_complete_and_read_only(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    pod = Pod.new("llm-0")
    req = plugin.request(pod, "modelcache-models", models_attr(small=served["small"].url))
    plugin.publish_once(req)  # a cold model: published at once, the fetch runs behind it
    key = key_of(served["small"].url)

    target = req.target_path
    seen, _ = wait_for_view(plugin, req, key, served["small"].info)
    assert seen["top"] == [key]
    # the pod's user is refused every write (EROFS, or EACCES where the mode says no first)
    assert set(seen["writes"].values()) <= {errno.EROFS, errno.EACCES}, seen["writes"]
    # root in the namespace cannot write either: the mounts themselves are read-only
    as_root = json.loads(plugin.py_in_ns(_WALK, target, key))
    assert set(as_root["writes"].values()) == {errno.EROFS}, as_root["writes"]

    mounted = {m[0]: (m[1], m[2]) for m in plugin.mounts_in_ns()}
    assert mounted[target][0] == "tmpfs" and mounted[target][1].startswith("ro,")
    bind_opts = set(mounted[f"{target}/{key}"][1].split(","))
    assert {"ro", "nosuid", "nodev"} <= bind_opts

    # a second publish of the same volume (a lost answer) is fine and changes nothing
    plugin.publish_once(req)
    assert sum(1 for m in plugin.mounts_in_ns() if m[0] == f"{target}/{key}") == 1


def test_a_view_is_published_at_once_and_its_files_appear_as_they_complete(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    web = served["other"].server
    web.faults.delay = 0.3  # every 256 KiB of body waits: the fetch takes seconds
    pods = [Pod.new(f"llm-{i}") for i in range(2)]
    reqs = [
        plugin.request(p, "modelcache-models", models_attr(other=served["other"].url)) for p in pods
    ]
    key = key_of(served["other"].url)
    before = dict(web.stats.per_path)
    try:
        for req in reqs:
            started = time.monotonic()
            plugin.publish_once(req)  # no ABORTED, no kubelet backoff: the fetch runs behind
            assert time.monotonic() - started < 10
        # the weights (4 x 256 KiB chunks at 0.3 s each) are not there yet
        weights = {f"{key}/{p}" for p in served["other"].info.weight_files}
        first = json.loads(plugin.py_in_ns(_WALK, reqs[0].target_path, key, nobody=True))
        assert first["top"] == [key]
        assert not weights <= set(first["files"]), first["files"]
        _, seen = wait_for_view(plugin, reqs[0], key, served["other"].info)
        wait_for_view(plugin, reqs[1], key, served["other"].info)
    finally:
        web.faults.delay = 0.0
    # files appeared one after another, never shrinking
    assert all(a <= b for a, b in itertools.pairwise(seen))
    # single flight: two pods, and every byte of every file sent once
    fetched = {
        p: n - before.get(p, 0)
        for p, n in web.stats.per_path.items()
        if p.startswith("other-llama/") and n != before.get(p, 0)
    }
    assert fetched == {f"other-llama/{p}": f.size for p, f in served["other"].info.files.items()}


def test_a_view_never_shows_another_pods_model(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    a, b = Pod.new("a"), Pod.new("b", namespace="team-b")
    req_a = plugin.request(a, "modelcache-models", models_attr(small=served["small"].url))
    req_b = plugin.request(b, "modelcache-models", models_attr(other=served["other"].url))
    plugin.publish(req_a)
    plugin.publish(req_b)
    key_a, key_b = key_of(served["small"].url), key_of(served["other"].url)
    wait_for_view(plugin, req_a, key_a, served["small"].info)
    seen_b, _ = wait_for_view(plugin, req_b, key_b, served["other"].info)
    assert seen_b["top"] == [key_b]
    # (tokenizer files are the same in both generated models: compare the weights)
    small = served["small"].info
    small_hashes = {small.files[p].sha256 for p in small.weight_files}
    assert not small_hashes & set(seen_b["files"].values())
    # and the way out of the bind leads only to the view's own read-only tmpfs
    up = plugin.py_in_ns(
        "import os,sys; print(sorted(os.listdir(os.path.join(sys.argv[1], sys.argv[2], '..'))))",
        req_b.target_path,
        key_b,
        nobody=True,
    )
    assert up.strip() == repr([key_b])


def test_unpublish_removes_the_view_and_twice_is_fine(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    pod = Pod.new("llm-0")
    req = plugin.request(pod, "modelcache-models", models_attr(small=served["small"].url))
    plugin.publish(req)
    plugin.unpublish(req)
    assert not any(m[0].startswith(req.target_path) for m in plugin.mounts_in_ns())
    assert not Path(req.target_path).exists()
    plugin.unpublish(req)  # the kubelet may retry: already gone is success
    never = plugin.request(Pod.new("never"), "modelcache-models", models_attr(x="hf://a/b"))
    plugin.unpublish(never)  # never published at all: also success


# ---- attacks ------------------------------------------------------------------------------------


def test_a_private_hub_model_is_published_only_to_pods_whose_token_reads_it(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    private = served["private"]
    attrs = models_attr(secret=private.url)
    owner = Pod.new("owner")
    owner_req = plugin.request(owner, "modelcache-models", attrs, {"HF_TOKEN": HUB_TOKEN})
    plugin.publish(owner_req)
    key = key_of(private.url)
    wait_for_view(plugin, owner_req, key, private.info)
    files_before = private.server.stats.file_requests

    attempts = {
        "wrong token": {"HF_TOKEN": "hf_guess"},
        "no Secret at all (the node's own token is never lent)": {},
        "its own hub in the Secret": {
            "HF_TOKEN": "hf_guess",
            "HF_ENDPOINT": "http://127.0.0.1:9/",  # ignored: endpoints are the node's
        },
    }
    for why, secrets in attempts.items():
        pod = Pod.new("thief", namespace="team-b")
        req = plugin.request(pod, "modelcache-models", attrs, secrets)
        with pytest.raises(grpc.RpcError) as err:
            plugin.publish_once(req)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, why
        details = err.value.details() or ""
        assert "pod team-b/thief may not read model 'secret' (hf://acme/secret-llama@main)" in (
            details
        ), details
        assert "401" in details, details
        assert not Path(req.target_path).exists(), why
    assert HUB_TOKEN not in plugin.log()

    # a pod of another namespace with its own valid token gets the warm cache at once (its
    # Secret keeps the token under another key name, which the volume names)
    friend = Pod.new("friend", namespace="team-c")
    renamed = {**attrs, "credentialKeys": "HF_TOKEN=token"}
    req = plugin.request(friend, "modelcache-models", renamed, {"token": HUB_TOKEN})
    plugin.publish_once(req)
    seen = json.loads(plugin.py_in_ns(_WALK, req.target_path, key, nobody=True))
    assert seen["files"] == expected_files(private.info, key)
    assert private.server.stats.file_requests == files_before  # no byte fetched again


def test_file_sources_outside_the_allowed_roots_are_refused(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    # another tenant's model in the cache, read as a file:// source: the attack of old
    owner = Pod.new("owner")
    owner_req = plugin.request(owner, "modelcache-models", models_attr(small=served["small"].url))
    plugin.publish(owner_req)
    key = key_of(served["small"].url)
    wait_for_view(plugin, owner_req, key, served["small"].info)
    cached = plugin.cache_dir / "models" / key / "data"
    allowed = plugin.root / "allowed"
    (allowed / "sneaky").symlink_to(cached)  # a link from an allowed root into the cache
    local = allowed / "local-model"
    shutil.copytree(served["other"].info.root, local)

    for uri in (f"file://{cached}", f"file://{allowed}/sneaky"):
        req = plugin.request(Pod.new("thief"), "modelcache-models", models_attr(stolen=uri))
        with pytest.raises(grpc.RpcError) as err:
            plugin.publish_once(req)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, uri
        assert "outside the directories this node allows" in (err.value.details() or "")
        assert str(allowed) in (err.value.details() or "")

    # under an allowed root it works (the control)
    req = plugin.request(Pod.new("ok"), "modelcache-models", models_attr(local=f"file://{local}"))
    plugin.publish(req)
    local_key = key_of(f"file://{local}")
    local_info = ModelInfo(local, served["other"].info.files)
    seen, _ = wait_for_view(plugin, req, local_key, local_info)
    assert seen["top"] == [local_key]


def test_an_unreachable_source_is_served_from_cache_only_if_nobody_needed_credentials(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    private, web = served["private"], served["small"].server
    both = {"models": f"secret={private.url}", "kind": "view"}
    public = models_attr(small=served["small"].url)
    owner = Pod.new("owner")
    for volume, attrs, secrets, uri, info in (
        ("v", both, {"HF_TOKEN": HUB_TOKEN}, private.url, private.info),
        ("w", public, {}, served["small"].url, served["small"].info),
    ):
        req = plugin.request(owner, volume, attrs, secrets)
        plugin.publish(req)
        wait_for_view(plugin, req, key_of(uri), info)
    plugin.stop()

    # the same node cache, with both sources now unreachable from the node
    closed = f"http://127.0.0.1:{free_port()}"
    second = plugin.root / "restarted"
    second.mkdir(mode=0o755)
    again = Plugin(second, env={"HF_ENDPOINT": closed}, cache_dir=plugin.cache_dir)
    web.faults.status_all = 503
    try:
        # fetched anonymously, asked for anonymously: served, with a warning in the log
        req = again.request(Pod.new("reader"), "w", public)
        again.publish_once(req)
        key = key_of(served["small"].url)
        seen = json.loads(again.py_in_ns(_WALK, req.target_path, key, nobody=True))
        assert seen["files"] == expected_files(served["small"].info, key)
        assert "source unreachable" in again.log()
        # a private model is never served without the check, with or without a token
        for secrets in ({}, {"HF_TOKEN": HUB_TOKEN}):
            req = again.request(Pod.new("thief", "team-b"), "v", both, secrets)
            with pytest.raises(grpc.RpcError) as err:
                again.publish_once(req)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the source is unreachable" in (err.value.details() or "")
            assert not Path(req.target_path).exists()
    finally:
        web.faults.status_all = 0
        again.stop()


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"csi.storage.k8s.io/ephemeral": "false"}, "only inline ephemeral volumes"),
        ({"kind": "rw"}, "kind='rw' is not valid"),
        ({"models": "hf://a/b,hf://c/d"}, "every entry must be name=uri"),
        ({"cacheDir": "/"}, "unknown volumeAttributes cacheDir"),
        ({"models": "x=pvc://claim/m"}, "pvc:// sources are not published"),
        ({"csi.storage.k8s.io/pod.uid": "../../etc"}, "is not a pod uid"),
        ({"credentialKeys": "HF_ENDPOINT=url"}, "credentialKeys: 'HF_ENDPOINT=url' is not"),
        ({"include": "*.json,,*.safetensors"}, "include: '' is not a glob"),
        ({"include": "*.json,bad\x07glob"}, "include: 'bad\\x07glob' is not a glob"),
    ],
)
def test_bad_volume_attributes_are_refused_with_the_key_named(
    plugin: Plugin, change: dict[str, str], expect: str
) -> None:
    req = plugin.request(Pod.new("p"), "modelcache-models", models_attr(m="hf://acme/x"))
    for k, v in change.items():
        req.volume_context[k] = v
    with pytest.raises(grpc.RpcError) as err:
        plugin.publish_once(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expect in (err.value.details() or "")


def test_a_target_outside_the_kubelets_pods_is_refused(plugin: Plugin) -> None:
    req = plugin.request(Pod.new("p"), "modelcache-models", models_attr(m="hf://acme/x"))
    for bad in ("/etc", f"{plugin.kubelet_root}/pods/../../x", "relative/mount"):
        req.target_path = bad
        with pytest.raises(grpc.RpcError) as err:
            plugin.publish_once(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "is not a normalized path under" in (err.value.details() or "")


# ---- fuse: the descriptor hand-over -------------------------------------------------------------

# The pod's sidecar: no privileges, receives the descriptor and serves a tiny filesystem
# through sidecar.fusefs on /dev/fd/N until the mount goes away.
_SIDECAR = """
import json, os, sys
from pathlib import Path
from typing import Any
from sidecar.node.handover import receive_handover
from sidecar import fusefs

socket_path, data_file = sys.argv[1], Path(sys.argv[2])
fd, info = receive_handover(socket_path, timeout=30)
status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
print(json.dumps({'info': info, 'uid': os.getuid(), 'cap_eff': status['CapEff'].strip()}),
      flush=True)

class Provider:
    def ensure_file(self, model, relpath):
        return data_file

ns = fusefs.Namespace({'tiny': [('hello.txt', data_file.stat().st_size)]})
fusefs.serve(ns, Provider(), f'/dev/fd/{fd}', None)
print('served until unmounted', flush=True)
"""


def test_fuse_descriptor_is_handed_to_an_unprivileged_sidecar_that_serves_it(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    pod = Pod.new("llm-fuse")
    attrs = {"models": f"small={served['small'].url}", "kind": "fuse"}
    req = plugin.request(pod, "modelcache-fuse", attrs)

    # the socket's emptyDir is not there yet: retry later, nothing mounted meanwhile
    with pytest.raises(grpc.RpcError) as err:
        plugin.publish_once(req)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "modelcache-fuse-socket" in (err.value.details() or "")
    assert not any(m[0] == req.target_path for m in plugin.mounts_in_ns())

    socket_dir = plugin.make_socket_volume(pod)
    plugin.publish_once(req)  # fuse volumes do not wait for the fetch
    fuse = [m for m in plugin.mounts_in_ns() if m[0] == req.target_path]
    assert len(fuse) == 1 and fuse[0][1] == "fuse.modelcache", fuse
    assert {"ro", "nosuid", "nodev"} <= set(fuse[0][2].split(","))

    data = plugin.root / "hello.txt"
    data.write_bytes(b"hello from the handed-over mount\n")
    data.chmod(0o644)
    sidecar = subprocess.Popen(
        as_nobody([sys.executable, "-c", _SIDECAR, str(socket_dir / "socket"), str(data)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert sidecar.stdout is not None
        first = sidecar.stdout.readline()
        assert first, sidecar.stderr.read() if sidecar.stderr else ""
        hello = json.loads(first)
        assert hello["uid"] == NOBODY and int(hello["cap_eff"], 16) == 0
        assert hello["info"]["volume_id"] == req.volume_id
        assert [m["name"] for m in hello["info"]["models"]] == ["small"]
        model = hello["info"]["models"][0]
        assert model["cache_key"] == key_of(served["small"].url)
        assert model["state"] in ("fetching", "complete") and model["files"], model

        # the app (another unprivileged user) reads through the mount the plugin made
        read = plugin.run_in_ns(["cat", f"{req.target_path}/tiny/hello.txt"], nobody=True)
        assert read.returncode == 0, read.stderr
        assert read.stdout == data.read_text()
        write = plugin.run_in_ns(["touch", f"{req.target_path}/tiny/new"], nobody=True)
        assert write.returncode != 0

        # a restarted sidecar connects again and gets the same connection
        again = receive_fd(socket_dir / "socket", timeout=10)
        try:
            assert is_fuse_device(again)
        finally:
            os.close(again)

        plugin.unpublish(req)  # unmounting ends the sidecar's FUSE loop cleanly
        out, errors = sidecar.communicate(timeout=60)
        assert sidecar.returncode == 0, errors
        assert "served until unmounted" in out
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait(timeout=30)
        for pipe in (sidecar.stdout, sidecar.stderr):
            if pipe is not None:
                pipe.close()
    assert not (socket_dir / "socket").exists()
    assert not Path(req.target_path).exists()
    assert not any(m[0] == req.target_path for m in plugin.mounts_in_ns())
    plugin.unpublish(req)


def test_receive_fd_names_the_socket_when_nothing_is_published(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(HandoverError, match="no FUSE descriptor from the node plugin at"):
        receive_fd(tmp_path / "socket", timeout=0.3)
    assert time.monotonic() - started < 5


# ---- the status line of the hand-over -----------------------------------------------------------


def publish_fuse(
    plugin: Plugin,
    pod: Pod,
    attributes: Mapping[str, str],
    secrets: Mapping[str, str] | None = None,
) -> tuple[pb.NodePublishVolumeRequest, Path]:
    """A ``kind: fuse`` volume published for ``pod`` (its socket emptyDir made first);
    returns the request and the hand-over socket."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    socket_dir = plugin.make_socket_volume(pod)
    req = plugin.request(pod, "modelcache-fuse", {**attributes, "kind": "fuse"}, secrets)
    plugin.publish_once(req)
    return req, socket_dir / "socket"


def test_status_goes_from_fetching_to_complete_while_the_view_fills(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    other = served["other"]
    web = other.server
    web.faults.delay = 0.3  # 4 chunks of the 1 MiB shard: the fetch takes over a second
    pod = Pod.new("llm-status")
    attrs = models_attr(other=other.url)
    try:
        view = plugin.request(pod, "modelcache-models", attrs)
        plugin.publish_once(view)
        fuse, sock = publish_fuse(plugin, pod, attrs)
        seen = wait_for_status(sock)
    finally:
        web.faults.delay = 0.0
    first, last = seen[0]["models"][0], seen[-1]["models"][0]
    key = key_of(other.url)
    total = other.info.total_bytes
    listing = {p: f.size for p, f in other.info.files.items()}
    # a cold model: fetching (never pending: the access check listed it before the publish)
    assert first["state"] == "fetching" and not first["complete"], first
    assert first["bytes_total"] == total and first["bytes_done"] < total
    assert {f["path"]: f["size"] for f in first["files"]} == listing
    assert not all(f["complete"] for f in first["files"])
    # the states only move forward, bytes never go back
    order = ["pending", "fetching", "complete"]
    states = [s["models"][0]["state"] for s in seen]
    assert [order.index(x) for x in states] == sorted(order.index(x) for x in states)
    done = [s["models"][0]["bytes_done"] for s in seen]
    assert done == sorted(done)
    assert any(s["models"][0]["rate"] > 0 for s in seen[:-1]), seen
    assert last["state"] == "complete" and last["complete"] and last["error"] is None
    assert last["bytes_done"] == last["bytes_total"] == total
    assert all(f["complete"] for f in last["files"])
    assert last["name"] == "other" and last["uri"] == other.url and last["cache_key"] == key
    assert last["revision"] is None and last["commit"] is None  # not a hub model
    # what the status calls complete is in the view, whole
    wait_for_view(plugin, view, key, other.info)
    plugin.unpublish(fuse)
    plugin.unpublish(view)


def test_status_of_a_hub_model_names_the_commit(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    private = served["private"]
    pod = Pod.new("hub-status")
    attrs = {"models": f"secret={private.url}", "credentialKeys": "HF_TOKEN=token"}
    _, sock = publish_fuse(plugin, pod, attrs, {"token": HUB_TOKEN})
    last = wait_for_status(sock)[-1]["models"][0]
    assert last["state"] == "complete", last
    assert last["revision"] == "main"
    assert last["commit"] == hub_commit(private)
    assert HUB_TOKEN not in json.dumps(last)


def test_a_cached_file_damaged_in_place_is_checked_again_before_a_pod_sees_it_complete(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    """Same size, other bytes (a bad disk, or a writer that got past every other guard):
    the next publish sees the file's stamp changed, reports it not complete, and the fill
    it starts checks it again; an http file has no sha256 to prove it intact, so it is
    quarantined and fetched again. The next pod gets the source's bytes."""
    small = served["small"]
    key = key_of(small.url)
    first = plugin.request(Pod.new("first"), "modelcache-models", models_attr(small=small.url))
    plugin.publish_once(first)
    wait_for_view(plugin, first, key, small.info)
    data = plugin.cache_dir / "models" / key / "data"
    victim = max((p for p in data.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:  # in place: same inode, same size
        f.seek(size // 2)
        f.write(b"\x00" * 4096)
    assert victim.stat().st_size == size
    before = dict(small.server.stats.per_path)

    _, sock = publish_fuse(plugin, Pod.new("second"), models_attr(small=small.url))
    first_look = read_status(sock, timeout=10)["models"][0]
    rel = victim.relative_to(data).as_posix()
    assert {f["path"]: f["complete"] for f in first_look["files"]}[rel] is False, first_look
    assert wait_for_status(sock)[-1]["models"][0]["state"] == "complete"
    fetched = {p for p, n in small.server.stats.per_path.items() if n != before.get(p, 0)}
    assert fetched == {f"small-llama/{rel}"}  # only the damaged file came again
    assert sha256_file(victim) == sha256_file(small.info.root / rel)
    quarantined = list((plugin.cache_dir / "models" / key / ".quarantine").rglob("*"))
    assert any(q.is_file() for q in quarantined), quarantined


def test_fills_and_warm_publishes_leave_the_records_the_agent_counts(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    """The agent's hit/miss/saved-bytes metrics come from records in the node cache: the
    plugin leaves one per fill (a miss, with the bytes fetched) and one per view of a
    complete model (a hit), as the in-pod warm-up of the legacy shape did."""
    small = served["small"]
    events = plugin.cache_dir / "events"

    def records() -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(events.glob("*.json"))]

    cold = plugin.request(Pod.new("cold"), "modelcache-models", models_attr(small=small.url))
    plugin.publish_once(cold)
    wait_for_view(plugin, cold, key_of(small.url), small.info)
    end = time.monotonic() + 30
    while not records() and time.monotonic() < end:  # written when the fill returns
        time.sleep(0.1)
    (miss,) = records()
    assert miss["result"] == "ok" and miss["models"][0]["result"] == "miss", miss
    assert miss["models"][0]["fetched_bytes"] == small.info.total_bytes

    warm = plugin.request(Pod.new("warm"), "modelcache-models", models_attr(small=small.url))
    plugin.publish_once(warm)
    _, sock = publish_fuse(plugin, Pod.new("warm"), models_attr(small=small.url))
    assert read_status(sock, timeout=10)["models"][0]["state"] == "complete"
    hits = [r for r in records() if r["models"][0]["result"] == "hit"]
    assert len(hits) == 1, records()  # the view counts; the same pod's fuse volume does not
    assert hits[0]["models"][0]["bytes"] == small.info.total_bytes


def test_a_failed_fetch_shows_in_the_status_until_a_new_publish_restarts_it(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    small = served["small"]
    web = small.server
    web.faults.fail_first, web.faults.fail_status = 10**6, 404
    attrs = models_attr(small=small.url)
    try:
        first = Pod.new("unlucky")
        _, sock = publish_fuse(plugin, first, attrs)
        failed = wait_for_status(sock)[-1]["models"][0]
        # every later connection says so, with the source's own message
        again = read_status(sock, timeout=10)["models"][0]
    finally:
        web.faults.fail_first, web.faults.fail_status = 0, 503
    for m in (failed, again):
        assert m["state"] == "failed" and not m["complete"], m
        assert "404" in m["error"] or "not found" in m["error"], m["error"]
        assert m["files"] and m["bytes_done"] < m["bytes_total"]
    # a new publish of the model starts the fetch again; every volume of it sees the end
    _, sock2 = publish_fuse(plugin, Pod.new("lucky"), attrs)
    assert wait_for_status(sock2)[-1]["models"][0]["state"] == "complete"
    assert read_status(sock, timeout=10)["models"][0]["state"] == "complete"


def test_a_failed_fetch_is_retried_by_the_status_polls_after_its_back_off(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    """A warm-up restarted by the kubelet polls the same volume again (no new publish):
    once the source is back, a poll after the back-off (--fetch-retry 1 s here) starts
    the fetch again, and the pod gets its model without being recreated."""
    small = served["small"]
    web = small.server
    web.faults.fail_first, web.faults.fail_status = 10**6, 503
    try:
        _, sock = publish_fuse(plugin, Pod.new("patient"), models_attr(small=small.url))
        assert wait_for_status(sock)[-1]["models"][0]["state"] == "failed"
        time.sleep(1.2)  # past the first back-off: the next poll retries, and fails again
        assert wait_for_status(sock)[-1]["models"][0]["state"] == "failed"
    finally:
        web.faults.fail_first, web.faults.fail_status = 0, 503
    states: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the second back-off is 2 s
        states.append(read_status(sock, timeout=10)["models"][0]["state"])
        if states[-1] == "complete":
            break
        time.sleep(0.3)
    assert states[-1] == "complete", states
    assert states[0] == "failed"  # it waited for the back-off before retrying
    assert "retrying the fetch of" in plugin.log()


def test_include_globs_choose_the_files_listed_and_fetched(
    plugin: Plugin, served: dict[str, ServedModel]
) -> None:
    other = served["other"]
    web = other.server
    before = dict(web.stats.per_path)
    attrs = {**models_attr(other=other.url), "include": "*.json"}
    _, sock = publish_fuse(plugin, Pod.new("json-only"), attrs)
    last = wait_for_status(sock)[-1]["models"][0]
    wanted = {p: f.size for p, f in other.info.files.items() if p.endswith(".json")}
    assert wanted and len(wanted) < len(other.info.files)
    assert last["state"] == "complete"
    assert {f["path"]: f["size"] for f in last["files"]} == wanted
    assert last["bytes_total"] == last["bytes_done"] == sum(wanted.values())
    fetched = {p for p, n in web.stats.per_path.items() if n != before.get(p, 0)}
    assert fetched == {f"other-llama/{p}" for p in wanted}  # no weight fetched

    # globs that select nothing: refused, naming the globs
    none = {**models_attr(other=other.url), "include": "*.gguf,*.bin"}
    req = plugin.request(Pod.new("typo"), "modelcache-models", none)
    with pytest.raises(grpc.RpcError) as err:
        plugin.publish_once(req)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "include *.gguf,*.bin selects none of the" in (err.value.details() or "")
    assert not Path(req.target_path).exists()


def test_the_status_of_a_model_of_3000_files_crosses_the_socket(plugin: Plugin) -> None:
    many = plugin.root / "allowed" / "many-files"
    many.mkdir()
    sizes = {}
    for i in range(3000):
        name = f"shard-{i:05d}-of-03000/part-{i:05d}.bin"
        (many / name).parent.mkdir()
        (many / name).write_bytes(b"x" * (i % 97 + 1))
        sizes[name] = i % 97 + 1
    _, sock = publish_fuse(plugin, Pod.new("many"), {"models": f"many=file://{many}"})
    started = time.monotonic()
    status = read_status(sock, timeout=10)
    took = time.monotonic() - started
    listed = status["models"][0]["files"]
    print(f"status of 3000 files: {len(json.dumps(status))} bytes in {took * 1000:.0f} ms")
    assert took < 5  # built (3000 stats) and sent at every connection: must stay cheap
    assert len(json.dumps(status)) > 200_000  # well past the old 64 KiB line
    assert {f["path"]: f["size"] for f in listed} == sizes
    last = wait_for_status(sock, deadline=300)[-1]["models"][0]
    assert last["state"] == "complete"
    assert last["bytes_done"] == last["bytes_total"] == sum(sizes.values())
