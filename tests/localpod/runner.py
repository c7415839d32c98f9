"""Run an (injected) pod's containers as local processes, the way the kubelet would.

There is no cluster and no container engine on the machines this runs on, so this is the
next best thing for seeing what modelcache does to a pod's start: the containers' commands,
args and env come from the pod spec itself; each container gets its own mount namespace
with every volumeMount bind-mounted at its mountPath (``subPath``, ``readOnly`` and
``mountPropagation`` honoured), so what the node plugin or a sidecar mounts reaches the app
container exactly as it would through the kubelet.

Node and volumes, in the kubelet's layout: a ``Node`` is a directory; ``host/`` is its root
filesystem for hostPath volumes, ``kubelet/`` the kubelet's root. A pod gets a uid
(``metadata.uid``, else a new uuid4; the downward API's ``metadata.uid`` serves it) and
``kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`` (mode 0777; ``medium: Memory``
is a tmpfs of ``sizeLimit``), ``.../kubernetes.io~csi/<name>/mount``, ``kubernetes.io~secret``
and ``kubernetes.io~configmap``. ``csi`` volumes go to the node's CSI plugin
(``Node.start_csi_plugin``: the real ``python -m sidecar csi``), called as the kubelet calls
it for an inline volume, NodePublishVolume with the volume context and the Secret's data,
retried with the kubelet's backoff on retryable codes (``tests.localpod.csiplugin``), after
the pod's emptyDirs exist (``empty_dirs_first=False``: in spec order, as the kubelet's
reconciler may do it). Every volume is set up before the first container starts. When the
pod stops, NodeUnpublishVolume for every csi volume, then the pod directory goes. Container
logs are kept under ``logs/<namespace>_<name>_<uid>/`` (like ``/var/log/pods``).

Users: every container runs as the ``runAsUser``/``runAsGroup`` of its securityContext, else
the pod's, else uid 1000 (the group defaults to the uid), with the pod's
``supplementalGroups`` and ``fsGroup``, through ``setpriv``: no capabilities at all (empty
bounding set) and no_new_privs, unless ``privileged: true`` (then root's full set). uid 0 is
never chosen by the runner; a container that asks for it fails the pod unless the runner
was given ``allow_root=True`` (the legacy ``nodeCache: hostPath`` output needs it).
``runAsNonRoot: true`` with uid 0 is refused as by the kubelet. Each container gets a private
tmpfs owned by its user at ``/root`` and at its ``HOME`` (the image's home, as if the image
were built for that user), so caches under ``~`` work; mountpoints its volumes need there
are made owned by that user. ``readOnlyRootFilesystem``: everything the namespace copied
from the host except ``/proc``, ``/sys`` and ``/dev`` is remounted read-only in it, while its
volumes and homes stay as mounted; the host's ``/tmp`` is part of ``/`` here, so it is
read-only too. Not emulated: ``capabilities.add`` (nothing is granted), seccomp and
AppArmor profiles, user namespaces, ``fsGroup`` ownership changes of volumes (emptyDirs are
0777 instead).

What is *not* emulated, on purpose: images (the host's root filesystem is every container's
root; ``python`` is the project's virtualenv and the app's executable, e.g. ``vllm``, is the
stand-in model server through a shim directory put first on ``PATH``; the checkout, the
virtualenv and the node directory must be reachable by the containers' users:
``tests.fixtures.nobody.open_to_others``), network namespaces (all containers share the host
loopback; the stand-in binds a free port instead of the one in its args and tells the runner
which, like a pod IP), resource limits, restarts of failed containers, and probes other than
the sidecar's startupProbe and the app's readiness. The network is loopback only: with
``hub_endpoint`` given, the Hugging Face Hub a container reaches by default (no
``HF_ENDPOINT`` of its own) is that loopback stand-in, as a node's DNS and proxy would route
``huggingface.co``; the pod spec itself is never changed for it.

Sequence (KEP-753 native sidecars): init containers in order, each to completion (non-zero
exit = pod failed); an init container with ``restartPolicy: Always`` is started and its
startupProbe exec'd (in its mount namespace, as its user, with its env) every
``periodSeconds`` until it passes or ``failureThreshold`` is reached; then the regular
containers in order, where a ``postStart`` exec hook (run the same way) blocks the next
container until it returns, and a failed one kills its container and fails the pod, as in
the kubelet (``modelcache.io/sidecar: classic`` depends on both). The pod is *ready* when
every app container answers its readiness check: the ``httpGet`` of its readinessProbe, else
``GET /v1/models``, polled every 50 ms (finer than a kubelet would, since this measures time
to ready rather than reacting to it).

Name resolution: every container gets the kubelet-managed ``/etc/hosts`` of its pod
(localhost, the pod's name, its ``hostAliases``), bound from ``<pod dir>/etc-hosts``; the
network itself is the host's loopback.

Needs root (``unshare``, ``mount``, ``setpriv``); there is no path-rewriting fallback:
without root, ``LocalPod`` raises ``RunnerError`` saying so, the tests skip with that reason
and the demo exits 2 with an explanation. Cleanup (also on failure and Ctrl-C): SIGTERM to
the app containers, then the sidecars in reverse order, SIGKILL to whatever is left after
the grace period, NodeUnpublishVolume for every csi volume, then every mount under the pod
directory is unmounted, the pod directory removed, and the mountpoint directories the runner
had to create on the host are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.localpod.csiplugin import (
    BACKOFF_CAP,
    RETRYABLE,
    Attempt,
    Backoff,
    MountFailed,
    NodePlugin,
    PodInfo,
    code_name,
    kill_leftover_plugin,
    publish_request,
    write_vol_data,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NSEXEC = Path(__file__).with_name("nsexec.py")
VENV_PYTHON = Path(sys.executable)

#: Entrypoints of the app images the examples use, for containers that set no ``command``.
IMAGE_ENTRYPOINTS: dict[str, list[str]] = {
    "vllm/vllm-openai": ["vllm", "serve"],
    "ghcr.io/huggingface/text-generation-inference": ["text-generation-launcher"],
    "ghcr.io/ggml-org/llama.cpp": ["/app/llama-server"],
    "ghcr.io/ggerganov/llama.cpp": ["/llama-server"],
    "lmsysorg/sglang": ["python3", "-m", "sglang.launch_server"],
}
#: Executables that stand for an inference server: basename -> stand-in framework.
STANDIN_EXECUTABLES = {
    "vllm": "vllm",
    "text-generation-launcher": "tgi",
    "llama-server": "llama",
}
#: ``python -m MODULE`` forms of the same servers.
STANDIN_MODULES = {
    "sglang.launch_server": "sglang",
    "vllm.entrypoints.openai.api_server": "vllm-api",
}
#: The node cache directory on a node (the legacy ``nodeCache: hostPath`` volume's path).
NODE_CACHE = "/var/lib/modelcache"
#: The uid (and gid) a container without runAsUser runs as: never root.
DEFAULT_UID = 1000
#: Directories every container gets as a private tmpfs owned by its user.
HOME_DIRS = ("/root",)
SETPRIV = "/usr/bin/setpriv"
#: Set on every container process (the node's directory): how ``clean_leftovers`` tells the
#: containers of an interrupted run from every other process on the machine.
NODE_MARKER_ENV = "MODELCACHE_LOCALPOD_NODE"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY_POLL = 0.05
CONTAINER_START_TIMEOUT = 60.0

Progress = Callable[[str], None]


class RunnerError(RuntimeError):
    """The pod cannot be run locally (unsupported spec, missing secret, not root, ...)."""


class PodFailed(RuntimeError):
    """A container failed, a probe never passed or the pod never became ready."""


@dataclass
class ContainerRun:
    name: str
    kind: str  # "init", "sidecar" (native) or "app"
    log: Path
    argv: list[str] = field(default_factory=list)
    started: float | None = None
    probed_ok: float | None = None
    hook_ok: float | None = None  # its postStart exec hook returned 0
    ended: float | None = None
    exit_code: int | None = None
    pid: int | None = None
    standin: bool = False  # runs the stand-in model server: ready = it answers HTTP


@dataclass
class PodRun:
    name: str
    t0: float
    containers: list[ContainerRun] = field(default_factory=list)
    ready_at: float | None = None
    failed: str | None = None
    served_models: list[str] = field(default_factory=list)
    bytes_fetched: int | None = None  # from the source, pod start to ready (source_bytes)
    app_ports: dict[str, int] = field(default_factory=dict)
    uid: str = ""
    # every NodePublishVolume / NodeUnpublishVolume call, in order
    csi_calls: list[Attempt] = field(default_factory=list)
    volumes_ready: float | None = None  # every volume set up (time.monotonic())

    @property
    def time_to_ready(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.t0

    def container(self, name: str) -> ContainerRun:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)

    def report_lines(self) -> list[str]:
        lines = []
        for c in self.containers:
            start = "-" if c.started is None else f"{c.started - self.t0:7.2f}s"
            end = "running" if c.ended is None else f"{c.ended - self.t0:7.2f}s"
            code = "" if c.exit_code is None else f" exit={c.exit_code}"
            probe = "" if c.probed_ok is None else f" started={c.probed_ok - self.t0:.2f}s"
            if c.hook_ok is not None:
                probe += f" postStart={c.hook_ok - self.t0:.2f}s"
            lines.append(
                f"  {c.kind:7} {c.name:22} start={start} end={end}{code}{probe} log={c.log}"
            )
        return lines


class Node:
    """A local directory standing for a node: ``host/`` is its root filesystem for hostPath
    volumes, ``kubelet/`` the kubelet's root (``pods/<uid>/volumes/...``), ``localpod/<uid>/``
    what the runner keeps per pod (shims, container specs, state), ``logs/`` the container
    logs and the CSI plugin's. Leaving ``with Node(...)`` stops its CSI plugin."""

    def __init__(self, root: Path, name: str = "localnode") -> None:
        self.root = root
        self.name = name
        self.plugin: NodePlugin | None = None

    def host_path(self, path: str) -> Path:
        return self.root / "host" / path.lstrip("/")

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def cache_dir(self) -> Path:
        """The node cache the CSI plugin owns (the legacy hostPath mode's directory)."""
        return self.host_path(NODE_CACHE)

    def pod_dir(self, uid: str) -> Path:
        return self.kubelet_root / "pods" / uid

    def run_dir(self, uid: str) -> Path:
        return self.root / "localpod" / uid

    def log_dir(self, namespace: str, name: str, uid: str) -> Path:
        return self.root / "logs" / f"{namespace}_{name}_{uid}"

    def start_csi_plugin(
        self,
        *,
        env: Mapping[str, str] | None = None,
        file_roots: tuple[Path, ...] = (),
        check_timeout: float | None = None,
    ) -> NodePlugin:
        """Start ``python -m sidecar csi`` for this node (in this process's mount namespace)
        and register it: pods' ``csi.modelcache.io`` volumes are published through it.
        ``env`` is the plugin's own configuration (``HF_ENDPOINT``, ...)."""
        if self.plugin is not None:
            raise RunnerError(f"node {self.root}: the CSI plugin is already running")
        kill_leftover_plugin(self._plugin_pid_file, self.kubelet_root)  # an interrupted run's
        self.root.mkdir(parents=True, exist_ok=True)
        self.plugin = NodePlugin(
            endpoint=self.root / "plugins" / "csi.modelcache.io" / "csi.sock",
            node_id=self.name,
            cache_dir=self.cache_dir,
            kubelet_root=self.kubelet_root,
            log_path=self.root / "logs" / "csi-plugin.log",
            pid_file=self._plugin_pid_file,
            env=env,
            file_roots=file_roots,
            check_timeout=check_timeout,
        )
        return self.plugin

    def stop_csi_plugin(self) -> int | None:
        """Stop the plugin (SIGTERM); its exit code, None when none was running."""
        plugin, self.plugin = self.plugin, None
        return None if plugin is None else plugin.stop()

    @property
    def _plugin_pid_file(self) -> Path:
        return self.root / "plugins" / "csi.modelcache.io" / "plugin.pid"

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_csi_plugin()


@contextlib.contextmanager
def scratch_node(prefix: str = "modelcache-node-") -> Iterator[Node]:
    """A node in a fresh directory under the system's temporary directory, mode 0755 so the
    pod's non-root users reach it (pytest's ``tmp_path`` lies under a 0700 directory), with
    its CSI plugin stopped, leftovers cleaned and the directory removed at the end."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    node = Node(root / "node")
    try:
        yield node
    finally:
        node.stop_csi_plugin()
        clean_leftovers(root)
        if not mountpoints_under(root):
            shutil.rmtree(root, ignore_errors=True)


def uses_csi_driver(pod: Mapping[str, Any], driver: str = "csi.modelcache.io") -> bool:
    """Does the pod (or pod template's pod) have an inline ``csi`` volume of ``driver``?"""
    spec = (
        pod_from_manifest(dict(pod))["spec"] if "spec" not in pod or "kind" in pod else pod["spec"]
    )
    return any((v.get("csi") or {}).get("driver") == driver for v in spec.get("volumes") or [])


def parse_quantity(value: str | int | float) -> int:
    """A Kubernetes quantity (``1Mi``, ``4Gi``, ``500M``, ``1e3``, ``128974848``) in bytes."""
    text = str(value).strip()
    number, factor = text, 1
    for suffix, scale in _QUANTITY_SUFFIXES:
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)], scale
            break
    try:
        n = float(number)
    except ValueError:
        raise RunnerError(f"{value!r} is not a Kubernetes quantity (e.g. 1Mi, 4Gi)") from None
    if n < 0:
        raise RunnerError(f"{value!r}: a size cannot be negative")
    return int(n * factor)


_QUANTITY_SUFFIXES = (
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("k", 10**3),
    ("M", 10**6),
    ("G", 10**9),
    ("T", 10**12),
)


def pod_from_manifest(obj: Mapping[str, Any] | list[Any]) -> dict[str, Any]:
    """The Pod (metadata + spec) of a Pod or of a workload's pod template.

    Accepts what ``python -m webhook inject`` prints: one object, a List, or the documents of
    a multi-document YAML as a list; the first workload found is used.
    """
    docs: list[Any] = list(obj) if isinstance(obj, list) else [obj]
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        kind = doc.get("kind")
        if kind == "List":
            with contextlib.suppress(RunnerError):
                return pod_from_manifest(list(doc.get("items") or []))
            continue
        if kind == "Pod":
            return {"metadata": dict(doc.get("metadata") or {}), "spec": doc["spec"]}
        spec = doc.get("spec") or {}
        if kind == "CronJob":
            spec = (spec.get("jobTemplate") or {}).get("spec") or {}
        template = spec.get("template")
        if isinstance(template, Mapping) and "spec" in template:
            meta = dict(template.get("metadata") or {})
            meta.setdefault("name", (doc.get("metadata") or {}).get("name", "pod"))
            meta.setdefault("namespace", (doc.get("metadata") or {}).get("namespace", "default"))
            return {"metadata": meta, "spec": template["spec"]}
    raise RunnerError("no Pod or pod template found in the manifest")


def expand_vars(value: str, env: Mapping[str, str]) -> str:
    """Kubelet's ``$(VAR)`` expansion: defined names are replaced, ``$$`` is a literal ``$``,
    undefined references and anything else stay as written."""
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2 : end]
                    out.append(env[name] if name in env else value[i : end + 1])
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def _image_entrypoint(image: str) -> list[str]:
    repo = image.split("@", 1)[0]
    if ":" in repo.rsplit("/", 1)[-1]:
        repo = repo.rsplit(":", 1)[0]
    for prefix, entry in IMAGE_ENTRYPOINTS.items():
        if repo == prefix:
            return list(entry)
    raise RunnerError(
        f"image {image!r} has no command in the pod spec and no known entrypoint; "
        f"known images: {', '.join(IMAGE_ENTRYPOINTS)}"
    )


def _shim_text(framework: str | None, port_file: Path, hub_endpoint: str | None = None) -> str:
    py = shlex.quote(str(VENV_PYTHON))
    head = (
        "#!/bin/sh\n"
        f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        f"export LOCALPOD_PORT_FILE={shlex.quote(str(port_file))}\n"
    )
    if hub_endpoint:
        # the node's network: the default hub is the loopback stand-in (the container's
        # own HF_ENDPOINT, when it has one, wins as it would anywhere)
        head += f'export HF_ENDPOINT="${{HF_ENDPOINT:-{hub_endpoint.rstrip("/")}}}"\n'
    if framework is not None:
        return head + f'exec {py} -m tests.localpod.standin {framework} "$@"\n'
    cases = "".join(
        f'    {mod}) shift 2; exec {py} -m tests.localpod.standin {fw} "$@";;\n'
        for mod, fw in STANDIN_MODULES.items()
    )
    return head + f'if [ "$1" = "-m" ]; then\n  case "$2" in\n{cases}  esac\nfi\nexec {py} "$@"\n'


def _runs_standin(argv: list[str]) -> bool:
    """Does this command line start an inference server (directly or in ``sh -c``)?"""
    words = {Path(w).name for a in argv for w in a.split()}
    return bool(words & set(STANDIN_EXECUTABLES) or words & set(STANDIN_MODULES))


def mountpoints_under(prefix: Path) -> list[str]:
    """Mount points in this namespace at or below ``prefix``, deepest first."""
    base = os.path.realpath(prefix)
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == base or point.startswith(base.rstrip("/") + "/"):
                points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def clean_leftovers(prefix: Path) -> list[str]:
    """Undo what a runner killed before its cleanup left under ``prefix`` (a node
    directory): SIGKILL the node's CSI plugin and the container processes of its pods, then
    lazily unmount what is mounted there. Returns what was killed and unmounted, for the
    caller to report.

    A container process is one whose environment carries this node's ``NODE_MARKER_ENV``
    (the runner sets it on every container): any other process is left alone, even one in
    a mount namespace that copied this node's mounts (a namespace someone else created
    while a pod ran holds copies of its mounts, and is none of the runner's business)."""
    root = os.path.realpath(prefix).rstrip("/")
    marker = f"{NODE_MARKER_ENV}={root}".encode()
    done = []
    pid_file = prefix / "plugins" / "csi.modelcache.io" / "plugin.pid"
    if (plugin := kill_leftover_plugin(pid_file, prefix / "kubelet")) is not None:
        done.append(plugin)  # first: it would answer a leftover unpublish by remounting
    own = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == own:
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)
                done.append(f"process {proc.name}")
    for point in dict.fromkeys(mountpoints_under(prefix)):  # stacked mounts: once each
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        done.append(f"mount {point}")
    return done


def _wait_eof(fd: int, timeout: float) -> None:
    """Read ``fd`` until its writers are gone (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready and not os.read(fd, 4096):
            return
    raise RunnerError(f"a container did not start within {timeout:g}s (mount setup hung?)")


def _kept_under(home: str) -> list[str]:
    """What of the host stays visible under a container's home tmpfs, read-only: the
    Python installation and virtualenv every container runs and the checkout (parts of
    the "image" here), when they live there (e.g. pyenv under /root)."""
    keep = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, REPO_ROOT)}
    inside = sorted(p for p in keep if Path(p).is_relative_to(home) and p != home)
    # an ancestor already brings its descendants
    return [p for p in inside if not any(p != q and Path(p).is_relative_to(q) for q in inside)]


def _check_reachable(path: Path, who: str) -> None:
    """Raise RunnerError unless every directory above ``path`` lets others through (the
    containers' users are not root): a checkout or node under a 0700 directory is not."""
    for d in [path, *path.parents]:
        if not os.stat(d).st_mode & 0o001:
            raise RunnerError(
                f"{d} is not searchable by others, so {who} cannot reach {path}: give others "
                f"search permission on it (tests.fixtures.nobody.open_to_others does, for tests)"
            )


class HostMountpoints:
    """Mountpoint paths (``/models``, ``/var/cache/modelcache``, ...) the runner had to create
    on the host, shared by every runner *process* on the machine.

    A path is removed only when no runner is left: removing a directory that is a mountpoint
    in another mount namespace detaches that mount there (Linux >= 3.18), which would pull
    ``/models`` out from under a pod another test run is starting. State lives in
    ``/run/modelcache-localpod`` under an flock: ``runners/<pid>-<n>`` and ``created.json``.
    """

    def __init__(self, root: Path = Path("/run/modelcache-localpod")) -> None:
        self.root = root

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        (self.root / "runners").mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _created(self) -> list[str]:
        try:
            return list(json.loads((self.root / "created.json").read_text()))
        except (OSError, ValueError):
            return []

    def others_running(self, token: str | None = None) -> bool:
        """Is a runner other than ``token`` alive (in any process) right now?"""
        with self._locked():
            for entry in (self.root / "runners").iterdir():
                pid = entry.name.split("-", 1)[0]
                if entry.name != token and pid.isdigit() and Path(f"/proc/{pid}").exists():
                    return True
            return False

    def register(self, token: str) -> None:
        with self._locked():
            (self.root / "runners" / token).touch()

    def ensure(self, target: Path, is_file: bool) -> bool:
        """Create ``target`` (and missing parents) if absent; True when something was made."""
        with self._locked():
            if target.exists() or target.is_symlink():
                return False
            new = [target]
            while not new[0].parent.exists():
                new.insert(0, new[0].parent)
            if is_file:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            else:
                target.mkdir(parents=True, exist_ok=True)
            created = self._created() + [str(p) for p in new]
            (self.root / "created.json").write_text(json.dumps(created))
            return True

    def release(self, token: str) -> None:
        with self._locked():
            (self.root / "runners" / token).unlink(missing_ok=True)
            for entry in (self.root / "runners").iterdir():
                pid = entry.name.split("-", 1)[0]
                if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
                    entry.unlink(missing_ok=True)  # a runner that died without cleanup
            if any((self.root / "runners").iterdir()):
                return
            for raw in sorted(self._created(), key=lambda p: p.count("/"), reverse=True):
                path = Path(raw)
                with contextlib.suppress(OSError):
                    if path.is_dir() and not path.is_symlink():
                        path.rmdir()  # only if empty: never deletes content
                    elif path.is_file() and path.stat().st_size == 0:
                        path.unlink()
            (self.root / "created.json").write_text("[]")


HOST_MOUNTPOINTS = HostMountpoints()


@dataclass(frozen=True)
class Identity:
    """Who a container's processes are: uid, gid, supplementary groups, privileges."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    privileged: bool = False
    read_only_root: bool = False

    def wrapper(self) -> list[str]:
        """The ``setpriv`` prefix that starts a command as this identity."""
        if self.privileged:
            return []  # root with every capability, as a privileged container is
        groups = (
            [f"--groups={','.join(str(g) for g in self.groups)}"]
            if self.groups
            else ["--clear-groups"]
        )
        return [
            SETPRIV,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            *groups,
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]


def container_identity(
    pod_spec: Mapping[str, Any], c: Mapping[str, Any], *, allow_root: bool = False
) -> Identity:
    """The user a container runs as: its securityContext, else the pod's, else DEFAULT_UID.
    Raises RunnerError for uid 0 (unless ``allow_root``) and for runAsNonRoot with uid 0."""
    pod_sc = pod_spec.get("securityContext") or {}
    sc = c.get("securityContext") or {}

    def pick(key: str) -> Any:
        return sc[key] if sc.get(key) is not None else pod_sc.get(key)

    uid = pick("runAsUser")
    uid = DEFAULT_UID if uid is None else int(uid)
    gid = pick("runAsGroup")
    gid = uid if gid is None else int(gid)
    name = c.get("name", "?")
    if uid == 0 and pick("runAsNonRoot"):
        raise RunnerError(
            f"container {name}: runAsNonRoot is true and runAsUser is 0 (the kubelet refuses "
            f"it: container has runAsNonRoot and image will run as root)"
        )
    if uid == 0 and not allow_root:
        raise RunnerError(
            f"container {name}: runAsUser 0: this runner runs every container as a non-root "
            f"user; pass allow_root=True for pods that need root (the legacy "
            f"nodeCache: hostPath output)"
        )
    groups = [int(g) for g in pod_sc.get("supplementalGroups") or []]
    if pod_sc.get("fsGroup") is not None:
        groups.append(int(pod_sc["fsGroup"]))
    return Identity(
        uid=uid,
        gid=gid,
        groups=tuple(dict.fromkeys(groups)),
        privileged=bool(sc.get("privileged")),
        read_only_root=bool(sc.get("readOnlyRootFilesystem")),
    )


class LocalPod:
    """One pod on one local node. Use as a context manager: leaving it stops everything.

    ``secrets`` and ``configmaps`` are the Secrets and ConfigMaps of the pod's namespace
    (name -> data). ``publish_backoff_cap`` caps the delay between NodePublishVolume retries
    (the kubelet's 2 min 2 s by default); ``publish_timeout`` bounds them overall (default:
    ``ready_timeout``)."""

    def __init__(
        self,
        pod: Mapping[str, Any],
        node: Node,
        *,
        name: str | None = None,
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        configmaps: Mapping[str, Mapping[str, str]] | None = None,
        progress: Progress | None = None,
        ready_timeout: float = 600.0,
        source_bytes: Callable[[], int] | None = None,
        grace: float = 15.0,
        hub_endpoint: str | None = None,
        allow_root: bool = False,
        empty_dirs_first: bool = True,
        publish_backoff_cap: float = BACKOFF_CAP,
        publish_timeout: float | None = None,
    ) -> None:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise RunnerError("the local pod runner needs root and unshare(1) for mounts")
        if not Path(SETPRIV).exists():
            raise RunnerError(f"the local pod runner needs {SETPRIV} (util-linux) for users")
        self.pod = pod_from_manifest(dict(pod)) if "spec" not in pod or "kind" in pod else pod
        self.spec: Mapping[str, Any] = self.pod["spec"]
        meta = self.pod.get("metadata") or {}
        self.name = name or meta.get("name") or meta.get("generateName", "pod-").rstrip("-")
        self.namespace = meta.get("namespace") or "default"
        self.uid = str(meta.get("uid") or uuid.uuid4())
        self.node = node
        self.dir = node.pod_dir(self.uid)
        self.run_dir = node.run_dir(self.uid)
        self.log_dir = node.log_dir(self.namespace, self.name, self.uid)
        self.secrets = secrets or {}
        self.configmaps = configmaps or {}
        self.progress = progress or (lambda _msg: None)
        self.ready_timeout = ready_timeout
        # a counter of bytes the model source has sent (e.g. the mirror's access log)
        self.source_bytes = source_bytes
        self._bytes_at_start = 0
        # where "the Hub" is on this loopback-only network (see the module docstring)
        if hub_endpoint is not None and (
            not hub_endpoint.startswith(("http://", "https://"))
            or any(c in hub_endpoint for c in '"$`\\ ')
        ):
            raise RunnerError(f"hub_endpoint {hub_endpoint!r}: expected an http(s) URL")
        self.hub_endpoint = hub_endpoint
        self.allow_root = allow_root
        self.empty_dirs_first = empty_dirs_first
        self.publish_backoff_cap = publish_backoff_cap
        self.publish_timeout = ready_timeout if publish_timeout is None else publish_timeout
        # the pod's own grace period, capped so a test never waits minutes on a stuck process
        self.grace = min(float(self.spec.get("terminationGracePeriodSeconds", 30)), grace)
        self.volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        self.run_info = PodRun(self.name, time.monotonic(), uid=self.uid)
        self._procs: list[tuple[ContainerRun, subprocess.Popen[bytes]]] = []
        self._token = f"{os.getpid()}-{id(self)}"
        self._registered = False
        self._shared: list[Path] = []
        self._logs: list[Any] = []
        # csi volumes NodePublishVolume was sent for: name -> (volume_id, target_path)
        self._csi: dict[str, tuple[str, str]] = {}
        self._plugin: NodePlugin | None = None
        # who each container runs as (set when the pod starts)
        self.identities: dict[str, Identity] = {}

    @property
    def pod_info(self) -> PodInfo:
        return PodInfo(
            name=self.name,
            namespace=self.namespace,
            uid=self.uid,
            service_account=str(
                self.spec.get("serviceAccountName") or self.spec.get("serviceAccount") or "default"
            ),
        )

    def volume_path(self, name: str) -> Path:
        """Where volume ``name`` lives on the node (what containers bind at their mountPath)."""
        vol = self.volumes.get(name)
        if vol is None:
            raise RunnerError(f"the pod has no volume {name!r}")
        volumes = self.dir / "volumes"
        if "emptyDir" in vol:
            return volumes / "kubernetes.io~empty-dir" / name
        if "csi" in vol:
            return volumes / "kubernetes.io~csi" / name / "mount"
        if "secret" in vol:
            return volumes / "kubernetes.io~secret" / name
        if "configMap" in vol:
            return volumes / "kubernetes.io~configmap" / name
        if "hostPath" in vol:
            return self.node.host_path(vol["hostPath"]["path"])
        if "persistentVolumeClaim" in vol:
            return self.node.root / "pvc" / str(vol["persistentVolumeClaim"]["claimName"])
        raise RunnerError(f"volume {name}: this kind of volume is not supported locally")

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> LocalPod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self) -> PodRun:
        """Start the pod and wait until it is ready; raise PodFailed otherwise."""
        containers = [
            *(self.spec.get("initContainers") or []),
            *(self.spec.get("containers") or []),
        ]
        self.identities = {
            c["name"]: container_identity(self.spec, c, allow_root=self.allow_root)
            for c in containers
        }
        for d in (self.dir, self.run_dir):
            if d.exists():
                if mountpoints_under(d):
                    raise RunnerError(f"{d} still has mounts from an earlier run")
                shutil.rmtree(d)
        (self.dir / "volumes").mkdir(parents=True)
        self._write_hosts_file()
        for sub in ("state", "bin", "spec"):
            (self.run_dir / sub).mkdir(parents=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.run_info = PodRun(self.name, time.monotonic(), uid=self.uid)
        if self.source_bytes is not None:
            self._bytes_at_start = self.source_bytes()
        HOST_MOUNTPOINTS.register(self._token)
        self._registered = True
        try:
            self._setup_volumes()
            self.run_info.volumes_ready = time.monotonic()
            self._prepare_bidirectional()
            for c in self.spec.get("initContainers") or []:
                if c.get("restartPolicy") == "Always":
                    self._start_sidecar(c)
                else:
                    self._run_init(c)
            for c in self.spec.get("containers") or []:
                self._start_app(c)
            self._wait_ready()
        except PodFailed as exc:
            self.run_info.failed = str(exc)
            raise
        return self.run_info

    def stop(self) -> None:
        """Stop every container, unpublish the csi volumes, unmount everything, remove the
        pod's directories and what the runner created on the host (logs are kept)."""
        apps = [(c, p) for c, p in self._procs if c.kind == "app"]
        sidecars = [(c, p) for c, p in self._procs if c.kind != "app"]
        self._terminate(apps)
        self._terminate(list(reversed(sidecars)))
        self._unpublish_all()
        for point in mountpoints_under(self.dir) if self.dir.exists() else []:
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        self._shared.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self._registered:
            HOST_MOUNTPOINTS.release(self._token)
            self._registered = False
        for d in (self.dir, self.run_dir):
            # never rmtree across a mount: a leftover bind could lead into the node cache
            if d.exists() and not mountpoints_under(d):
                shutil.rmtree(d, ignore_errors=True)
            elif d.exists():
                self.progress(f"{self.name}: {d} still has mounts; left in place")

    def _terminate(self, procs: list[tuple[ContainerRun, subprocess.Popen[bytes]]]) -> None:
        for _, p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for c, p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # leftovers of the container's group
            p.wait()
            if c.ended is None:
                c.ended = time.monotonic()
                c.exit_code = p.returncode

    # -- volumes --------------------------------------------------------------------------
    def _setup_volumes(self) -> None:
        """Every volume of the pod, before any container: emptyDirs (tmpfs for
        ``medium: Memory``), Secrets and ConfigMaps, hostPaths, then the csi volumes through
        the node's plugin, retried with the kubelet's backoff while it says so."""
        vols = list(self.volumes.values())
        if self.empty_dirs_first:
            vols.sort(key=lambda v: "csi" in v)  # stable: spec order within each group
        pending: list[tuple[Mapping[str, Any], Any, Backoff, float]] = []
        deadline = time.monotonic() + self.publish_timeout
        for vol in vols:
            if "csi" not in vol:
                self._setup_local_volume(vol)
                continue
            req = self._publish_request(vol)
            backoff = Backoff(cap=self.publish_backoff_cap)
            if (delay := self._publish(vol, req, backoff)) is not None:
                pending.append((vol, req, backoff, time.monotonic() + delay))
        while pending:
            pending.sort(key=lambda p: p[3])
            vol, req, backoff, at = pending.pop(0)
            if at > deadline:
                last = next(a for a in reversed(self.run_info.csi_calls) if a.volume == vol["name"])
                raise PodFailed(
                    f'MountVolume.SetUp failed for volume "{vol["name"]}": not published within '
                    f"{self.publish_timeout:g}s; last answer: {last.code}: {last.message}"
                )
            time.sleep(max(0.0, at - time.monotonic()))
            if (delay := self._publish(vol, req, backoff)) is not None:
                pending.append((vol, req, backoff, time.monotonic() + delay))

    def _write_hosts_file(self) -> None:
        """The kubelet-managed ``/etc/hosts`` of the pod (``<pod dir>/etc-hosts``, bound into
        every container): localhost, the pod's own name, then the pod's ``hostAliases``. The
        node's own entries are not in it, as on a node."""
        lines = [
            "# Kubernetes-managed hosts file.",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            "fe00::0\tip6-localnet",
            "fe00::0\tip6-mcastprefix",
            "fe00::1\tip6-allnodes",
            "fe00::2\tip6-allrouters",
            f"127.0.0.1\t{self.name}",  # the pod IP: loopback here
        ]
        aliases = self.spec.get("hostAliases") or []
        if aliases:
            lines += ["", "# Entries added by HostAliases."]
            for a in aliases:
                lines.append(f"{a.get('ip', '')}\t{' '.join(a.get('hostnames') or [])}")
        hosts = self.dir / "etc-hosts"
        hosts.write_text("\n".join(lines) + "\n")
        hosts.chmod(0o644)

    def _setup_local_volume(self, vol: Mapping[str, Any]) -> None:
        name = str(vol["name"])
        path = self.volume_path(name)
        if "emptyDir" in vol:
            path.mkdir(parents=True)
            path.chmod(0o777)  # the kubelet's emptyDir mode: any user of the pod may write
            spec = vol["emptyDir"] or {}
            if spec.get("medium") == "Memory":
                opts = "mode=0777"
                if spec.get("sizeLimit") is not None:
                    opts += f",size={parse_quantity(spec['sizeLimit'])}"
                self._host_mount("-t", "tmpfs", "-o", opts, f"emptydir-{name}", str(path))
        elif "secret" in vol or "configMap" in vol:
            kind, store = (
                ("secret", self.secrets) if "secret" in vol else ("configMap", self.configmaps)
            )
            ref = str(vol[kind].get("secretName") or vol[kind].get("name", ""))
            data = store.get(ref)
            if data is None and not vol[kind].get("optional"):
                raise PodFailed(
                    f'MountVolume.SetUp failed for volume "{name}" : {kind.lower()} "{ref}" '
                    "not found"
                )
            path.mkdir(parents=True)
            for key, value in (data or {}).items():
                (path / key).write_text(value)
                (path / key).chmod(0o644)
        elif "hostPath" in vol:
            hp = vol["hostPath"]
            kind = hp.get("type", "")
            if kind in ("DirectoryOrCreate", ""):
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            elif not path.exists():
                raise PodFailed(f"hostPath {hp['path']} (type {kind}) does not exist on the node")
        elif "persistentVolumeClaim" in vol:
            path.mkdir(parents=True, exist_ok=True)
        else:
            self.volume_path(name)  # raises for what is not supported

    def _host_mount(self, *args: str) -> None:
        proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RunnerError(f"mount {' '.join(args)}: {proc.stderr.strip()}")

    def _publish_request(self, vol: Mapping[str, Any]) -> Any:
        name = str(vol["name"])
        driver = str(vol["csi"].get("driver", ""))
        plugin = self.node.plugin
        if plugin is None or plugin.driver != driver:
            raise PodFailed(
                f'MountVolume.SetUp failed for volume "{name}" : kubernetes.io/csi: '
                f"mounter.SetUpAt failed to get CSI client: driver name {driver} not found in "
                f"the list of registered CSI drivers"
            )
        self._plugin = plugin
        target = self.volume_path(name)
        try:
            req = publish_request(self.pod_info, vol, target, self.secrets)
        except MountFailed as exc:
            raise PodFailed(str(exc)) from None
        write_vol_data(target, self.pod_info, vol)
        return req

    def _publish(self, vol: Mapping[str, Any], req: Any, backoff: Backoff) -> float | None:
        """One NodePublishVolume: None when published, the delay before the next try on a
        retryable answer; raises PodFailed on any other answer."""
        assert self._plugin is not None
        name = str(vol["name"])
        self._csi[name] = (req.volume_id, req.target_path)
        t = time.monotonic()
        try:
            self._plugin.publish(req)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            now = time.monotonic()
            self.run_info.csi_calls.append(
                Attempt("publish", name, now, now - t, code.name, details)
            )
            if code not in RETRYABLE:
                raise PodFailed(
                    f'MountVolume.SetUp failed for volume "{name}" : rpc error: '
                    f"code = {code_name(code)} desc = {details}"
                ) from None
            delay = backoff.next_delay()
            self.progress(
                f"{self.name}: volume {name}: NodePublishVolume {code.name}: {details} "
                f"(retry in {delay:g}s)"
            )
            return delay
        now = time.monotonic()
        self.run_info.csi_calls.append(Attempt("publish", name, now, now - t, "OK"))
        self.progress(f"{self.name}: volume {name} published by {self._plugin.driver}")
        return None

    def _unpublish_all(self, attempts: int = 5) -> None:
        """NodeUnpublishVolume for every csi volume a publish was sent for (the plugin
        answers success for what it never published), retried on retryable codes."""
        plugin, self._plugin = self._plugin, None
        csi, self._csi = self._csi, {}
        if plugin is None:
            return
        for name, (volume_id, target) in reversed(csi.items()):
            backoff = Backoff(cap=2.0)
            for i in range(attempts):
                t = time.monotonic()
                try:
                    plugin.unpublish(volume_id, target, timeout=60)
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                    now = time.monotonic()
                    self.run_info.csi_calls.append(
                        Attempt("unpublish", name, now, now - t, code.name, details)
                    )
                    if code in RETRYABLE and i + 1 < attempts:
                        time.sleep(backoff.next_delay())
                        continue
                    self.progress(
                        f"{self.name}: volume {name}: NodeUnpublishVolume failed: "
                        f"{code.name}: {details}"
                    )
                    break
                now = time.monotonic()
                self.run_info.csi_calls.append(Attempt("unpublish", name, now, now - t, "OK"))
                break

    # -- containers -----------------------------------------------------------------------
    def _run_init(self, c: Mapping[str, Any]) -> None:
        run, proc = self._launch(c, "init")
        self.progress(f"{self.name}: init container {run.name} running")
        code = proc.wait()
        run.ended, run.exit_code = time.monotonic(), code
        if code != 0:
            raise PodFailed(
                f"init container {run.name} exited {code}; last log lines:\n{self._tail(run)}"
            )
        took = run.ended - (run.started or run.ended)
        self.progress(f"{self.name}: init container {run.name} done in {took:.1f}s")

    def _start_sidecar(self, c: Mapping[str, Any]) -> None:
        run, proc = self._launch(c, "sidecar")
        self.progress(f"{self.name}: sidecar {run.name} started")
        probe = c.get("startupProbe")
        if probe:
            self._wait_probe(run, proc, c, probe)
        run.probed_ok = time.monotonic()
        took = run.probed_ok - (run.started or run.probed_ok)
        self.progress(f"{self.name}: sidecar {run.name} passed its startupProbe after {took:.1f}s")

    def _start_app(self, c: Mapping[str, Any]) -> None:
        run, proc = self._launch(c, "app")
        self.progress(f"{self.name}: container {run.name} started: {shlex.join(run.argv)}")
        lifecycle = (c.get("lifecycle") or {}).get("postStart")
        if lifecycle:
            self._post_start(run, proc, c, lifecycle)

    def _post_start(
        self,
        run: ContainerRun,
        proc: subprocess.Popen[bytes],
        c: Mapping[str, Any],
        hook: Mapping[str, Any],
    ) -> None:
        """The kubelet's postStart: run the exec hook in the container and start no further
        container until it returns (the classic sidecar relies on exactly this); a failed
        hook gets the container killed, and with no restarts here that fails the pod.

        The kubelet sets no timeout on an exec hook; the pod's ``ready_timeout`` bounds it
        here so a hook that never returns fails the test instead of hanging it."""
        argv = list((hook.get("exec") or {}).get("command") or [])
        if not argv:
            raise RunnerError(f"postStart of {run.name}: only exec hooks with a command")
        left = self.run_info.t0 + self.ready_timeout - time.monotonic()
        code = self._exec_in(run, c, argv, timeout=max(1.0, left))
        if code == 0:
            run.hook_ok = time.monotonic()
            took = run.hook_ok - (run.started or run.hook_ok)
            self.progress(f"{self.name}: postStart of {run.name} returned after {took:.1f}s")
            return
        self._terminate([(run, proc)])  # like the kubelet: SIGTERM, SIGKILL after the grace
        why = "timed out" if code == -1 else f"exited {code}"
        raise PodFailed(
            f"postStart hook of {run.name} {why}: container killed; "
            f"last log lines:\n{self._tail(run)}"
        )

    def _launch(
        self, c: Mapping[str, Any], kind: str
    ) -> tuple[ContainerRun, subprocess.Popen[bytes]]:
        name = c["name"]
        ident = self.identities[name]
        env = self._container_env(c)
        command = [expand_vars(str(a), env) for a in c.get("command") or []]
        args = [expand_vars(str(a), env) for a in c.get("args") or []]
        argv = (command or _image_entrypoint(str(c.get("image", "")))) + args
        if not c.get("command") and not argv:
            raise RunnerError(f"container {name} has nothing to run")
        bindir = self._shims(name, ident)
        env["PATH"] = f"{bindir}:{env.get('PATH', BASE_PATH)}"
        exe = Path(argv[0]).name
        if argv[0].startswith("/") and not Path(argv[0]).exists() and (bindir / exe).exists():
            argv[0] = str(bindir / exe)  # e.g. /app/llama-server in the image
        homes = self._homes(env)
        hosts = {
            "source": str(self.dir / "etc-hosts"),
            "target": "/etc/hosts",
            "readOnly": False,
            "propagation": "None",
            "create": None,
        }
        spec = {
            "mounts": [*self._mounts(c, ident, homes), hosts],
            "homes": [
                {"path": h, "uid": ident.uid, "gid": ident.gid, "keep": _kept_under(h)}
                for h in homes
            ],
            "readOnlyRoot": ident.read_only_root,
            "wrapper": ident.wrapper(),
            "argv": argv,
            "cwd": c.get("workingDir") or "/",
        }
        spec_file = self.run_dir / "spec" / f"{name}.json"
        run = ContainerRun(name, kind, self.log_dir / f"{name}.log", argv=argv)
        run.standin = _runs_standin(argv)
        log = open(run.log, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        cmd = ["unshare", "--mount", "--propagation", "unchanged", "--"]
        cmd += [str(VENV_PYTHON), "-I", str(NSEXEC), str(spec_file)]
        # nsexec holds the pipe's write end until it execs the command (close-on-exec):
        # the container counts as started, and may be probed, only once its mounts are
        # in place, as the kubelet probes only after the runtime started the container
        started_r, started_w = os.pipe()
        spec["startedFd"] = started_w
        spec_file.write_text(json.dumps(spec, indent=1))
        try:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(started_w,),
            )
        finally:
            os.close(started_w)
        try:
            _wait_eof(started_r, CONTAINER_START_TIMEOUT)
        finally:
            os.close(started_r)
        run.started, run.pid = time.monotonic(), proc.pid
        self.run_info.containers.append(run)
        self._procs.append((run, proc))
        return run, proc

    def _homes(self, env: Mapping[str, str]) -> list[str]:
        """The container's HOME-like directories (each becomes its private tmpfs)."""
        homes = list(HOME_DIRS)
        home = env.get("HOME", "")
        if home.startswith("/") and home != "/" and Path(home).is_dir() and home not in homes:
            homes.append(home)
        return homes

    def _container_env(self, c: Mapping[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {"PATH": BASE_PATH, "HOME": "/root", "HOSTNAME": self.name}
        env[NODE_MARKER_ENV] = os.path.realpath(self.node.root)
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                ref = src["secretRef"]
                data = self.secrets.get(ref["name"])
                if data is None and not ref.get("optional"):
                    raise RunnerError(f"container {c['name']}: secret {ref['name']!r} not given")
            else:
                ref = src.get("configMapRef") or {}
                data = self.configmaps.get(ref.get("name", ""))
                if data is None and not ref.get("optional"):
                    raise RunnerError(
                        f"container {c['name']}: configMap {ref.get('name')!r} not given"
                    )
            env.update({prefix + k: v for k, v in (data or {}).items()})
        for e in c.get("env") or []:
            value = self._env_value(c["name"], e, env)
            if value is not None:
                env[e["name"]] = value
        return env

    def _env_value(self, cname: str, e: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
        if "valueFrom" not in e:
            return expand_vars(str(e.get("value", "")), env)
        src = e["valueFrom"]
        for kind, store in (("secretKeyRef", self.secrets), ("configMapKeyRef", self.configmaps)):
            if kind in src:
                ref = src[kind]
                value = (store.get(ref.get("name", "")) or {}).get(ref.get("key", ""))
                if value is None and not ref.get("optional"):
                    raise RunnerError(
                        f"container {cname}: env {e['name']} needs {kind} "
                        f"{ref.get('name')}/{ref.get('key')}, which was not given"
                    )
                return value
        if "fieldRef" in src:
            fields = {
                "metadata.name": self.name,
                "metadata.namespace": self.namespace,
                "metadata.uid": self.uid,
                "spec.nodeName": self.node.name,
                "spec.serviceAccountName": self.pod_info.service_account,
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
            }
            return fields.get(src["fieldRef"].get("fieldPath", ""), "")
        if "resourceFieldRef" in src:
            return "0"
        raise RunnerError(f"container {cname}: env {e['name']}: unsupported valueFrom {src}")

    def _shims(self, cname: str, ident: Identity) -> Path:
        bindir = self.run_dir / "bin" / cname
        bindir.mkdir(parents=True, exist_ok=True)
        state = self.run_dir / "state" / cname  # the stand-in writes its port file here
        state.mkdir(parents=True, exist_ok=True)
        os.chown(state, ident.uid, ident.gid)
        port_file = state / "port"
        shims: dict[str, str | None] = {"python": None, "python3": None}
        shims.update(STANDIN_EXECUTABLES)
        for exe, framework in shims.items():
            path = bindir / exe
            path.write_text(_shim_text(framework, port_file, self.hub_endpoint))
            path.chmod(0o755)
        if ident.uid != 0:
            _check_reachable(bindir, f"container {cname} (uid {ident.uid})")
        return bindir

    def _mounts(
        self, c: Mapping[str, Any], ident: Identity, homes: list[str]
    ) -> list[dict[str, Any]]:
        mounts = []
        for vm in sorted(
            c.get("volumeMounts") or [], key=lambda m: len(Path(m["mountPath"]).parts)
        ):
            if vm["name"] not in self.volumes:
                raise RunnerError(
                    f"container {c['name']}: volumeMount names no volume {vm['name']!r}"
                )
            src = self.volume_path(vm["name"])
            # never look into what the CSI plugin mounted: a FUSE mount whose server (the
            # pod's sidecar) has not started yet would block every stat until it does
            plugin_made = "csi" in self.volumes[vm["name"]]
            if vm.get("subPath"):
                sub = Path(vm["subPath"])
                if sub.is_absolute() or ".." in sub.parts:
                    raise RunnerError(f"container {c['name']}: bad subPath {vm['subPath']!r}")
                src = src / sub
                if not plugin_made and not src.exists():
                    src.mkdir(parents=True)  # the kubelet creates missing subPath dirs
            is_file = not plugin_made and src.is_file()
            target = Path(vm["mountPath"])
            in_home = any(target.is_relative_to(h) for h in homes)
            if not in_home:
                self._ensure_target(target, is_file=is_file)
            mounts.append(
                {
                    "source": str(src),
                    "target": str(target),
                    "readOnly": bool(vm.get("readOnly")),
                    "propagation": vm.get("mountPropagation") or "None",
                    # made inside the container's home tmpfs, owned by its user
                    "create": {"uid": ident.uid, "gid": ident.gid, "isFile": is_file}
                    if in_home
                    else None,
                }
            )
        return mounts

    def _ensure_target(self, target: Path, is_file: bool) -> None:
        """Create a mountPath on the host if missing (removed when the last runner stops)."""
        if HOST_MOUNTPOINTS.ensure(target, is_file):
            self.progress(
                f"{self.name}: created mountpoint {target} on the host (removed at the end)"
            )

    def _prepare_bidirectional(self) -> None:
        """Make the source of every Bidirectional mount a shared mount in the host namespace,
        so a mount made on it inside one container propagates to the others."""
        names = {
            vm["name"]
            for c in [
                *(self.spec.get("initContainers") or []),
                *(self.spec.get("containers") or []),
            ]
            for vm in c.get("volumeMounts") or []
            if vm.get("mountPropagation") == "Bidirectional"
        }
        for name in sorted(names):
            vol = self.volumes.get(name)
            if vol is None or "emptyDir" not in vol:
                raise RunnerError(
                    f"Bidirectional mount of {name!r}: only emptyDir volumes supported"
                )
            src = self.volume_path(name)
            for args in (["--bind", str(src), str(src)], ["--make-shared", str(src)]):
                self._host_mount(*args)
            self._shared.append(src)

    # -- probes and readiness -------------------------------------------------------------
    def _exec_in(
        self, run: ContainerRun, c: Mapping[str, Any], argv: list[str], timeout: float | None
    ) -> int:
        """Run ``argv`` in the container's mount namespace with its env (an exec probe)."""
        env = self._container_env(c)
        env["PATH"] = f"{self.run_dir / 'bin' / run.name}:{env['PATH']}"
        wrapper = self.identities[run.name].wrapper()
        cmd = ["nsenter", f"--target={run.pid}", "--mount", "--", *wrapper, *argv]
        with open(run.log, "ab") as log:
            try:
                return subprocess.run(
                    cmd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                    cwd="/",
                ).returncode
            except subprocess.TimeoutExpired:
                return -1

    def _wait_probe(
        self,
        run: ContainerRun,
        proc: subprocess.Popen[bytes],
        c: Mapping[str, Any],
        probe: Mapping[str, Any],
    ) -> None:
        argv = list((probe.get("exec") or {}).get("command") or [])
        if not argv:
            raise RunnerError(f"startupProbe of {run.name}: only exec probes are supported")
        period = float(probe.get("periodSeconds", 10))
        threshold = int(probe.get("failureThreshold", 3))
        timeout = float(probe.get("timeoutSeconds", 1))
        next_at = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
        failures = 0
        while True:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = time.monotonic() + period
            if proc.poll() is not None:
                run.ended, run.exit_code = time.monotonic(), proc.returncode
                raise PodFailed(
                    f"sidecar {run.name} exited {proc.returncode} before its startupProbe "
                    f"passed; last log lines:\n{self._tail(run)}"
                )
            if self._exec_in(run, c, argv, timeout) == 0:
                return
            failures += 1
            if failures >= threshold:
                raise PodFailed(
                    f"startupProbe of {run.name} failed {failures} times "
                    f"(period {period}s); last log lines:\n{self._tail(run)}"
                )

    def _wait_ready(self) -> None:
        deadline = self.run_info.t0 + self.ready_timeout
        apps = [(r, p) for r, p in self._procs if r.kind == "app"]
        specs = {c["name"]: c for c in self.spec.get("containers") or []}
        pending = {r.name for r, _ in apps}
        while pending:
            for run, proc in apps:
                if run.name not in pending:
                    continue
                if proc.poll() is not None:
                    run.ended, run.exit_code = time.monotonic(), proc.returncode
                    raise PodFailed(
                        f"container {run.name} exited {proc.returncode} before it was ready; "
                        f"last log lines:\n{self._tail(run)}"
                    )
                if self._ready(run, specs[run.name]):
                    pending.discard(run.name)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise PodFailed(f"not ready after {self.ready_timeout}s: {sorted(pending)}")
            time.sleep(READY_POLL)
        self.run_info.ready_at = time.monotonic()
        if self.source_bytes is not None:
            self.run_info.bytes_fetched = self.source_bytes() - self._bytes_at_start
        self.progress(f"{self.name}: ready after {self.run_info.time_to_ready:.2f}s")

    def _ready(self, run: ContainerRun, c: Mapping[str, Any]) -> bool:
        port_file = self.run_dir / "state" / run.name / "port"
        http_get = (c.get("readinessProbe") or {}).get("httpGet")
        if not run.standin:
            return True  # no inference server here: started = ready (nothing to measure)
        if not port_file.exists():
            return False  # the stand-in writes it once the weights are loaded and it listens
        try:
            ports = json.loads(port_file.read_text())
        except ValueError:
            return False  # being written
        port = int(ports["port"])
        self.run_info.app_ports[run.name] = port
        path = http_get.get("path", "/") if http_get else "/v1/models"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                if resp.status != 200:
                    return False
        except (OSError, urllib.error.URLError):
            return False
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                data = json.load(resp)
            self.run_info.served_models += [m["id"] for m in data.get("data", [])]
        return True

    def _tail(self, run: ContainerRun, lines: int = 15) -> str:
        try:
            text = run.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])


@contextlib.contextmanager
def running_pod(pod: Mapping[str, Any], node: Node, **kwargs: Any) -> Iterator[LocalPod]:
    """``with running_pod(pod, node) as p: p.run_info ...``: ready pod, stopped at exit."""
    lp = LocalPod(pod, node, **kwargs)
    try:
        lp.run()
        yield lp
    finally:
        lp.stop()
