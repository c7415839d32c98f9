"""Run an (injected) pod's containers as local processes, the way the kubelet would.

There is no cluster and no container engine on the machines this runs on, so this is the
next best thing for seeing what modelcache does to a pod's start: the containers' commands,
args and env come from the pod spec itself; each container gets its own mount namespace
with every volumeMount bind-mounted at its mountPath (hostPath -> ``<node>/host/<path>``,
emptyDir -> ``<pod-dir>/emptydir/<name>``, ``subPath``, ``readOnly`` and
``mountPropagation`` honoured), so the FUSE mount that ``modelcache-sidecar`` makes inside its
namespace reaches the app container exactly as it would through the kubelet.

What is *not* emulated, on purpose: images (the host's root filesystem is every container's
root; ``python`` is the project's virtualenv and the app's executable, e.g. ``vllm``, is the
stand-in model server through a shim directory put first on ``PATH``), network namespaces
(all containers share the host loopback; the stand-in binds a free port instead of the one
in its args and tells the runner which, like a pod IP), resource limits, restarts of failed
containers, and probes other than the sidecar's startupProbe and the app's readiness.
The network is loopback only: with ``hub_endpoint`` given, the Hugging Face Hub a container
reaches by default (no ``HF_ENDPOINT`` of its own) is that loopback stand-in, as a node's
DNS and proxy would route ``huggingface.co``; the pod spec itself is never changed for it.

Sequence (KEP-753 native sidecars): init containers in order, each to completion (non-zero
exit = pod failed); an init container with ``restartPolicy: Always`` is started and its
startupProbe exec'd (in its mount namespace, with its env) every ``periodSeconds`` until it
passes or ``failureThreshold`` is reached; then the regular containers in order, where a
``postStart`` exec hook (run in the container's mount namespace with its env) blocks the
next container until it returns, and a failed one kills its container and fails the pod, as
in the kubelet (``modelcache.io/sidecar: classic`` depends on both). The pod is *ready*
when every app container answers its readiness check: the ``httpGet`` of its readinessProbe,
else ``GET /v1/models``, polled every 50 ms (finer than a kubelet would, since this measures
time to ready rather than reacting to it).

Needs root (``unshare``, ``mount``); there is no path-rewriting fallback: without root,
``LocalPod`` raises ``RunnerError`` saying so, the tests skip with that reason and the demo
exits 2 with an explanation. Cleanup (also on failure and Ctrl-C): SIGTERM to the app
containers, then the sidecars in reverse order (the sidecar unmounts its FUSE filesystem),
SIGKILL to whatever is left after the grace period, then every mount under the pod directory
is unmounted and the mountpoint directories the runner had to create on the host are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY_POLL = 0.05

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


@dataclass(frozen=True)
class Node:
    """A local directory standing for a node: ``host/`` is its root filesystem for hostPath
    volumes, ``pods/<name>/`` holds each pod's emptyDirs, logs and runner state."""

    root: Path

    def host_path(self, path: str) -> Path:
        return self.root / "host" / path.lstrip("/")

    def pod_dir(self, pod_name: str) -> Path:
        return self.root / "pods" / pod_name


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
    directory): SIGKILL every process whose mount namespace bind-mounts something from
    there (its containers), then lazily unmount what is mounted there. Returns what was
    killed and unmounted, for the caller to report."""
    base = os.path.realpath(prefix).rstrip("/") + "/"
    done = []
    for point in dict.fromkeys(mountpoints_under(prefix)):  # stacked mounts: once each
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        done.append(f"mount {point}")
    # Only processes in *other* mount namespaces are container processes: a leftover bind in
    # this namespace would show in every host process's mountinfo (never kill those).
    own_ns = os.readlink("/proc/self/ns/mnt")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "mnt") == own_ns:
                continue
            lines = (proc / "mountinfo").read_text().splitlines()
        except OSError:
            continue
        # field 4 is the mount's root inside its filesystem: for our binds, a node path
        if any(len(f := line.split()) > 4 and f[3].startswith(base) for line in lines):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)
                done.append(f"process {proc.name}")
    return done


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


class LocalPod:
    """One pod on one local node. Use as a context manager: leaving it stops everything."""

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
    ) -> None:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise RunnerError("the local pod runner needs root and unshare(1) for mounts")
        self.pod = pod_from_manifest(dict(pod)) if "spec" not in pod or "kind" in pod else pod
        self.spec: Mapping[str, Any] = self.pod["spec"]
        meta = self.pod.get("metadata") or {}
        self.name = name or meta.get("name") or meta.get("generateName", "pod-").rstrip("-")
        self.namespace = meta.get("namespace") or "default"
        self.node = node
        self.dir = node.pod_dir(self.name)
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
        # the pod's own grace period, capped so a test never waits minutes on a stuck process
        self.grace = min(float(self.spec.get("terminationGracePeriodSeconds", 30)), grace)
        self.volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        self.run_info = PodRun(self.name, time.monotonic())
        self._procs: list[tuple[ContainerRun, subprocess.Popen[bytes]]] = []
        self._token = f"{os.getpid()}-{id(self)}"
        self._registered = False
        self._shared: list[Path] = []
        self._logs: list[Any] = []

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> LocalPod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self) -> PodRun:
        """Start the pod and wait until it is ready; raise PodFailed otherwise."""
        if self.dir.exists():
            if mountpoints_under(self.dir):
                raise RunnerError(f"{self.dir} still has mounts from an earlier run")
            shutil.rmtree(self.dir)
        for sub in ("emptydir", "logs", "state", "bin", "spec"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.run_info = PodRun(self.name, time.monotonic())
        if self.source_bytes is not None:
            self._bytes_at_start = self.source_bytes()
        HOST_MOUNTPOINTS.register(self._token)
        self._registered = True
        try:
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
        """Stop every container, unmount everything, remove what the runner created."""
        apps = [(c, p) for c, p in self._procs if c.kind == "app"]
        sidecars = [(c, p) for c, p in self._procs if c.kind != "app"]
        self._terminate(apps)
        self._terminate(list(reversed(sidecars)))
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
        empty = self.dir / "emptydir"
        if empty.exists() and not mountpoints_under(self.dir):
            shutil.rmtree(empty, ignore_errors=True)

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
        env = self._container_env(c)
        command = [expand_vars(str(a), env) for a in c.get("command") or []]
        args = [expand_vars(str(a), env) for a in c.get("args") or []]
        argv = (command or _image_entrypoint(str(c.get("image", "")))) + args
        if not c.get("command") and not argv:
            raise RunnerError(f"container {name} has nothing to run")
        bindir = self._shims(name)
        env["PATH"] = f"{bindir}:{env.get('PATH', BASE_PATH)}"
        exe = Path(argv[0]).name
        if argv[0].startswith("/") and not Path(argv[0]).exists() and (bindir / exe).exists():
            argv[0] = str(bindir / exe)  # e.g. /app/llama-server in the image
        spec = {"mounts": self._mounts(c), "argv": argv, "cwd": c.get("workingDir") or "/"}
        spec_file = self.dir / "spec" / f"{name}.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        run = ContainerRun(name, kind, self.dir / "logs" / f"{name}.log", argv=argv)
        run.standin = _runs_standin(argv)
        log = open(run.log, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        cmd = ["unshare", "--mount", "--propagation", "unchanged", "--"]
        cmd += [str(VENV_PYTHON), "-I", str(NSEXEC), str(spec_file)]
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        run.started, run.pid = time.monotonic(), proc.pid
        self.run_info.containers.append(run)
        self._procs.append((run, proc))
        return run, proc

    def _container_env(self, c: Mapping[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {"PATH": BASE_PATH, "HOME": "/root", "HOSTNAME": self.name}
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
                "spec.nodeName": "localnode",
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
            }
            return fields.get(src["fieldRef"].get("fieldPath", ""), "")
        if "resourceFieldRef" in src:
            return "0"
        raise RunnerError(f"container {cname}: env {e['name']}: unsupported valueFrom {src}")

    def _shims(self, cname: str) -> Path:
        bindir = self.dir / "bin" / cname
        bindir.mkdir(parents=True, exist_ok=True)
        port_file = self.dir / "state" / f"{cname}.port"
        shims: dict[str, str | None] = {"python": None, "python3": None}
        shims.update(STANDIN_EXECUTABLES)
        for exe, framework in shims.items():
            path = bindir / exe
            path.write_text(_shim_text(framework, port_file, self.hub_endpoint))
            path.chmod(0o755)
        return bindir

    def _volume_source(self, vol: Mapping[str, Any]) -> Path:
        name = str(vol["name"])
        if "hostPath" in vol:
            hp = vol["hostPath"]
            src = self.node.host_path(hp["path"])
            kind = hp.get("type", "")
            if kind in ("DirectoryOrCreate", ""):
                src.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate":
                src.parent.mkdir(parents=True, exist_ok=True)
                src.touch()
            elif not src.exists():
                raise PodFailed(f"hostPath {hp['path']} (type {kind}) does not exist on the node")
            return src
        if "emptyDir" in vol:
            src = self.dir / "emptydir" / name
            src.mkdir(parents=True, exist_ok=True)
            return src
        for kind, store in (("secret", self.secrets), ("configMap", self.configmaps)):
            if kind in vol:
                ref = str(vol[kind].get("secretName") or vol[kind].get("name", ""))
                src = self.dir / kind / name
                src.mkdir(parents=True, exist_ok=True)
                for key, value in (store.get(ref) or {}).items():
                    (src / key).write_text(value)
                return src
        if "persistentVolumeClaim" in vol:
            src = self.node.root / "pvc" / str(vol["persistentVolumeClaim"]["claimName"])
            src.mkdir(parents=True, exist_ok=True)
            return src
        raise RunnerError(f"volume {name}: this kind of volume is not supported locally")

    def _mounts(self, c: Mapping[str, Any]) -> list[dict[str, Any]]:
        mounts = []
        for vm in sorted(
            c.get("volumeMounts") or [], key=lambda m: len(Path(m["mountPath"]).parts)
        ):
            vol = self.volumes.get(vm["name"])
            if vol is None:
                raise RunnerError(
                    f"container {c['name']}: volumeMount names no volume {vm['name']!r}"
                )
            src = self._volume_source(vol)
            if vm.get("subPath"):
                sub = Path(vm["subPath"])
                if sub.is_absolute() or ".." in sub.parts:
                    raise RunnerError(f"container {c['name']}: bad subPath {vm['subPath']!r}")
                src = src / sub
                if not src.exists():
                    src.mkdir(parents=True)  # the kubelet creates missing subPath dirs
            target = Path(vm["mountPath"])
            self._ensure_target(target, is_file=src.is_file())
            mounts.append(
                {
                    "source": str(src),
                    "target": str(target),
                    "readOnly": bool(vm.get("readOnly")),
                    "propagation": vm.get("mountPropagation") or "None",
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
            src = self._volume_source(vol)
            for args in (["--bind", str(src), str(src)], ["--make-shared", str(src)]):
                proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise RunnerError(f"mount {' '.join(args)}: {proc.stderr.strip()}")
            self._shared.append(src)

    # -- probes and readiness -------------------------------------------------------------
    def _exec_in(
        self, run: ContainerRun, c: Mapping[str, Any], argv: list[str], timeout: float | None
    ) -> int:
        """Run ``argv`` in the container's mount namespace with its env (an exec probe)."""
        env = self._container_env(c)
        env["PATH"] = f"{self.dir / 'bin' / run.name}:{env['PATH']}"
        cmd = ["nsenter", f"--target={run.pid}", "--mount", "--", *argv]
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
        port_file = self.dir / "state" / f"{run.name}.port"
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
