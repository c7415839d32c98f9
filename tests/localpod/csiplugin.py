"""The kubelet's side of CSI for the local pod runner: the node plugin process and its calls.

A node of the runner (``tests.localpod.runner.Node``) starts the real ``csi.modelcache.io``
node plugin, ``python -m sidecar csi``, as the node-driver-registrar would have it registered
with the kubelet, and the runner calls it the way the kubelet's CSI volume plugin
(``pkg/volume/csi`` in Kubernetes) does for an inline ``csi`` volume of a CSIDriver with
``podInfoOnMount: true`` and no attach:

- ``volume_id`` is ``csi-<sha256(pod uid + volume name)>`` (``makeVolumeHandle``);
- ``target_path`` is ``<kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount``;
  the kubelet makes its parent (with ``vol_data.json``), the plugin the target;
- ``volume_capability`` is a mount with the volume's ``fsType``, access mode single-node
  writer; ``readonly`` the volume's ``readOnly``;
- ``volume_context`` is ``volumeAttributes`` plus ``csi.storage.k8s.io/ephemeral: "true"``,
  ``pod.name``, ``pod.namespace``, ``pod.uid`` and ``serviceAccount.name``;
- ``secrets`` is the data of the ``nodePublishSecretRef`` Secret of the pod's namespace; a
  missing Secret fails the mount with the kubelet's message naming it.

Errors: the kubelet retries a failed mount with exponential backoff (500 ms, doubling, capped
at 2 min 2 s: ``goroutinemap/exponentialbackoff``), for every code. Here only the codes that
say "try again" (ABORTED, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) are retried,
bounded overall; any other code fails the pod at once with the plugin's message, which is
what a test or the demo wants to see instead of minutes of identical retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sidecar.node import _csi_pb2 as pb
from sidecar.node import _csi_pb2_grpc as pb_grpc
from sidecar.node.flags import DRIVER_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The codes after which the runner calls NodePublishVolume again.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
#: The kubelet's time limit for one CSI call (``csiTimeout``).
CALL_TIMEOUT = 120.0
#: The kubelet's backoff: the first retry after 500 ms, doubling up to 2 min 2 s.
BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 122.0
POD_INFO_KEYS = (
    "csi.storage.k8s.io/pod.name",
    "csi.storage.k8s.io/pod.namespace",
    "csi.storage.k8s.io/pod.uid",
    "csi.storage.k8s.io/serviceAccount.name",
)


class PluginError(RuntimeError):
    """The node plugin could not be started."""


class MountFailed(RuntimeError):
    """A volume could not be set up; the message is the kubelet's event text."""


def volume_handle(pod_uid: str, volume_name: str) -> str:
    """The volume id the kubelet sends for an inline volume (``makeVolumeHandle``)."""
    return "csi-" + hashlib.sha256(f"{pod_uid}{volume_name}".encode()).hexdigest()


def code_name(code: grpc.StatusCode) -> str:
    """``PermissionDenied`` for ``PERMISSION_DENIED``: how gRPC-Go prints a code."""
    return "".join(w.capitalize() for w in code.name.split("_"))


@dataclass(frozen=True)
class PodInfo:
    """What ``podInfoOnMount`` tells the plugin about the pod."""

    name: str
    namespace: str
    uid: str
    service_account: str = "default"


def publish_request(
    pod: PodInfo,
    volume: Mapping[str, Any],
    target: Path,
    secrets: Mapping[str, Mapping[str, str]],
) -> Any:
    """The NodePublishVolumeRequest of the inline ``csi`` volume ``volume`` (a pod volume),
    with the data of its ``nodePublishSecretRef`` taken from ``secrets`` (the Secrets of the
    pod's namespace). Raises MountFailed, as the kubelet fails the mount, when it is missing."""
    name = str(volume["name"])
    csi = volume["csi"]
    data: Mapping[str, str] = {}
    ref = csi.get("nodePublishSecretRef")
    if ref:
        secret = str(ref.get("name", ""))
        found = secrets.get(secret)
        if found is None:
            raise MountFailed(
                f'MountVolume.SetUp failed for volume "{name}" : fetching NodePublishSecretRef '
                f"{pod.namespace}/{secret} failed: kubernetes.io/csi: failed to find the "
                f"secret {secret} in the namespace {pod.namespace} with error: secrets "
                f'"{secret}" not found'
            )
        data = found
    context = {str(k): str(v) for k, v in (csi.get("volumeAttributes") or {}).items()}
    context.update(
        {
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
        }
    )
    return pb.NodePublishVolumeRequest(
        volume_id=volume_handle(pod.uid, name),
        target_path=str(target),
        volume_capability=pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(fs_type=str(csi.get("fsType") or "")),
            access_mode=pb.VolumeCapability.AccessMode(
                mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        ),
        readonly=bool(csi.get("readOnly")),
        secrets=dict(data),
        volume_context=context,
    )


def write_vol_data(target: Path, pod: PodInfo, volume: Mapping[str, Any]) -> None:
    """The kubelet's ``vol_data.json`` next to the target (it makes that directory)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    name = str(volume["name"])
    (target.parent / "vol_data.json").write_text(
        json.dumps(
            {
                "driverName": volume["csi"].get("driver", ""),
                "volumeHandle": volume_handle(pod.uid, name),
                "specVolID": name,
                "podUID": pod.uid,
                "volumeLifecycleMode": "Ephemeral",
            }
        )
    )


@dataclass
class Attempt:
    """One NodePublishVolume or NodeUnpublishVolume call, as the runner saw it."""

    call: str  # "publish" or "unpublish"
    volume: str
    at: float  # time.monotonic() when the call returned
    took: float
    code: str  # "OK" or the gRPC code's name (ABORTED, ...)
    message: str = ""


@dataclass
class Backoff:
    """The kubelet's exponential backoff: ``initial``, doubling, at most ``cap``."""

    initial: float = BACKOFF_INITIAL
    cap: float = BACKOFF_CAP
    _next: float = field(default=0.0, init=False)

    def next_delay(self) -> float:
        self._next = self.initial if self._next == 0.0 else min(self._next * 2, self.cap)
        return self._next


class NodePlugin:
    """``python -m sidecar csi`` on a local node, and the kubelet's gRPC client to it.

    Runs in the caller's mount namespace (the runner's): the views and FUSE mounts it makes
    on target paths are there before the pod's containers get their own namespaces, which
    copy them, as containers on a node get the kubelet's mounts."""

    def __init__(
        self,
        *,
        endpoint: Path,
        node_id: str,
        cache_dir: Path,
        kubelet_root: Path,
        log_path: Path,
        pid_file: Path,
        env: Mapping[str, str] | None = None,
        file_roots: tuple[Path, ...] = (),
        check_timeout: float | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.node_id = node_id
        self.cache_dir = cache_dir
        self.kubelet_root = kubelet_root
        self.log_path = log_path
        self.pid_file = pid_file
        cmd = [
            sys.executable,
            "-m",
            "sidecar",
            "csi",
            f"--csi-endpoint=unix://{endpoint}",
            f"--node-id={node_id}",
            f"--cache-dir={cache_dir}",
            f"--kubelet-root={kubelet_root}",
            *(f"--file-root={r}" for r in file_roots),
        ]
        if check_timeout is not None:
            cmd.append(f"--check-timeout={check_timeout:g}")
        for d in (endpoint.parent, cache_dir, kubelet_root / "pods", log_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            "NODE_NAME": node_id,
            **(env or {}),
        }
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        pid_file.write_text(f"{self.proc.pid}\n")
        self.channel = grpc.insecure_channel(f"unix://{endpoint}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=start_timeout)
        except grpc.FutureTimeoutError:
            self.stop()
            raise PluginError(
                f"the {DRIVER_NAME} node plugin did not answer on {endpoint} within "
                f"{start_timeout:g}s; its log ({log_path}):\n{self.log_tail()}"
            ) from None
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.node = pb_grpc.NodeStub(self.channel)
        name = self.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10).name
        if name != DRIVER_NAME:
            self.stop()
            raise PluginError(f"the plugin at {endpoint} is {name!r}, not {DRIVER_NAME}")

    @property
    def driver(self) -> str:
        return DRIVER_NAME

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def publish(self, req: Any, timeout: float = CALL_TIMEOUT) -> None:
        self.node.NodePublishVolume(req, timeout=timeout)

    def unpublish(self, volume_id: str, target_path: str, timeout: float = CALL_TIMEOUT) -> None:
        self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target_path),
            timeout=timeout,
        )

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (the plugin finishes its running calls), SIGKILL after ``grace``."""
        self.channel.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()
        self.pid_file.unlink(missing_ok=True)
        return self.proc.returncode


def kill_leftover_plugin(pid_file: Path, kubelet_root: Path) -> str | None:
    """SIGKILL the plugin an interrupted run left (its pid file names it, and its command
    line must name this node's kubelet root, so a reused pid is never hit)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return None
    if f"--kubelet-root={kubelet_root}".encode() not in cmdline:
        pid_file.unlink(missing_ok=True)
        return None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    pid_file.unlink(missing_ok=True)
    return f"node plugin {pid}"
