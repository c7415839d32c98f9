"""The pod side in node mode: ``warmup`` and ``mount`` with ``--node-socket``, unprivileged.

A test-local node side stands in for the CSI node plugin: in a private mount namespace
(``unshare --mount``) it opens ``/dev/fuse``, mounts it on a target with the plugin's own
``sidecar.node.mounts.mount_fuse``, and answers every connection to its socket with the
descriptor and the status JSON (``sidecar.node.handover.send_fd``) read from a file the test
rewrites. Its "view" is a directory of ``<cache key>/<file>`` that gains files as the test
completes them (renamed into place, as the node cache's ``data/`` does).

The warm-up, the sidecar, the probe and the app run as uid 65534 with no capabilities
(``setpriv``), the sidecar and the app inside the node side's mount namespace (``nsenter``)
where the FUSE mount is, as a pod's containers see the plugin's mounts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.modelsource import parse_model_arg
from tests.fixtures.nobody import open_to_others

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the node side mounts /dev/fuse and the pod side runs as uid 65534: needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool}(1) is not installed (util-linux)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(autouse=True)
def _checkout_reachable_by_nobody() -> Iterator[None]:
    with open_to_others(REPO, Path(sys.prefix)):
        yield


def as_nobody(argv: list[str]) -> list[str]:
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


ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))},
    "PYTHONPATH": str(REPO),
}

# The node side: mount /dev/fuse on the target, hand the descriptor and the status out.
# SIGUSR1 unmounts the target (the kubelet's NodeUnpublishVolume), which ends the connection.
_NODE = """
import json, os, signal, sys, threading
from sidecar.node import handover, mounts
target, sock_path, status_file = sys.argv[1:4]
fd = os.open('/dev/fuse', os.O_RDWR | os.O_CLOEXEC)
mounts.mount_fuse(target, fd)
listener = handover.listen(sock_path)
listener.setblocking(True)
def unpublish(*_):
    threading.Thread(target=mounts.unmount, args=(target,), kwargs={'lazy': True}).start()
signal.signal(signal.SIGUSR1, unpublish)
print('ready', flush=True)
while True:
    conn, _ = listener.accept()
    with conn:
        with open(status_file) as f:
            info = json.load(f)
        try:
            handover.send_fd(conn, fd, info)
        except OSError as exc:
            print('hand-over failed:', exc, flush=True)
"""


class Model:
    """One model of the node's status; ``files`` maps path to bytes."""

    def __init__(self, name: str, uri: str, files: dict[str, bytes]) -> None:
        self.name = name
        self.arg = f"{name}={uri}"
        source = parse_model_arg(self.arg).source
        self.uri = source.uri
        self.key = source.cache_key
        self.is_hub = source.is_hub
        self.files = files
        self.done: set[str] = set()
        self.state = "fetching"
        self.error: str | None = None
        self.rate = 0.0

    def status(self) -> dict[str, Any]:
        total = sum(len(b) for b in self.files.values())
        done = sum(len(self.files[p]) for p in self.done)
        return {
            "name": self.name,
            "uri": self.uri,
            "cache_key": self.key,
            "state": self.state,
            "complete": self.state == "complete",
            "error": self.error,
            "bytes_done": done,
            "bytes_total": total,
            "rate": self.rate,
            "revision": "main" if self.is_hub else None,
            "commit": COMMIT if self.is_hub else None,
            "files": [
                {"path": p, "size": len(b), "complete": p in self.done}
                for p, b in sorted(self.files.items())
            ],
        }


class Node:
    """The test's node side, in a mount namespace of its own."""

    def __init__(self, root: Path, models: list[Model], *, start: bool = True) -> None:
        self.root = root
        self.models = models
        self.target = root / "target"
        self.view = root / "view"
        self.socket_dir = root / "socket-volume"
        self.socket = self.socket_dir / "socket"
        self.status_file = root / "status.json"
        for d in (self.target, self.view, self.socket_dir):
            d.mkdir(mode=0o755)
        self.socket_dir.chmod(0o777)
        self.log_path = root / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        for m in models:
            (self.view / m.key).mkdir(mode=0o755)
        self.publish()
        if start:
            self.start()

    def start(self) -> None:
        cmd = ["unshare", "--mount", "--propagation", "private", "--"]
        cmd += [
            sys.executable,
            "-c",
            _NODE,
            str(self.target),
            str(self.socket),
            str(self.status_file),
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 30
        while not self.log().startswith("ready"):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"node side not ready:\n{self.log()}"
            time.sleep(0.05)  # polling its first line, bounded

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def complete(self, model: Model, *paths: str) -> None:
        """Files become complete: into the view first (atomic rename), then the status."""
        for p in paths:
            dest = self.view / model.key / p
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            tmp = dest.with_name(f".tmp-{dest.name}")
            tmp.write_bytes(model.files[p])
            tmp.chmod(0o444)
            tmp.rename(dest)
            model.done.add(p)
        if model.done == set(model.files):
            model.state = "complete"
        self.publish()

    def publish(self) -> None:
        info = {"volume_id": "csi-test", "models": [m.status() for m in self.models]}
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.rename(self.status_file)

    def ns(self, argv: list[str], *, nobody: bool = True) -> list[str]:
        assert self.proc is not None
        return ["nsenter", f"--target={self.proc.pid}", "--mount", "--"] + (
            as_nobody(argv) if nobody else argv
        )

    def run_in_ns(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ns(argv), capture_output=True, text=True, timeout=timeout, check=False, env=ENV
        )

    def unpublish(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)
            self._log.close()


@pytest.fixture
def root() -> Iterator[Path]:
    # not tmp_path: its parents are 0700, and uid 65534 must reach the socket and the view
    d = Path(tempfile.mkdtemp(prefix="modelcache-node-mode-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nodes(root: Path) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for n in made:
        n.stop()


def tiny_model(name: str = "llm", uri: str = "hf://acme/tiny-llama") -> Model:
    return Model(
        name,
        uri,
        {
            "config.json": b'{"architectures": ["Tiny"]}',
            "model-00001-of-00002.safetensors": os.urandom(300_000),
            "model-00002-of-00002.safetensors": os.urandom(200_000),
            "nested/extra.bin": os.urandom(70_000),
        },
    )


def warmup(node: Node, *models: Model, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "sidecar", "warmup", "--node-socket", str(node.socket)]
    for m in models:
        cmd += ["--model", m.arg]
    return as_nobody(cmd + list(extra))


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def termination_log(root: Path) -> Path:
    """The kubelet creates the file; the warm-up (uid 65534) only writes it."""
    p = root / "termination-log"
    p.write_text("")
    p.chmod(0o666)
    return p


# ---- warm-up ----------------------------------------------------------------------------------


def test_warmup_says_cache_hit_when_everything_is_complete_at_the_first_look(
    root: Path, nodes: list[Node]
) -> None:
    m = tiny_model()
    node = Node(root, [m])
    nodes.append(node)
    node.complete(m, *m.files)
    done = run(warmup(node, m, extra=("--termination-log", str(termination_log(root)))))
    assert done.returncode == 0, done.stderr
    assert "warmup complete: cache hit: 1 model(s), 4 file(s)" in done.stderr
    assert "cache hit" in (root / "termination-log").read_text()


def test_warmup_prints_progress_while_the_node_fetches_then_exits_0(
    root: Path, nodes: list[Node]
) -> None:
    m = tiny_model()
    m.rate = 5e6
    node = Node(root, [m])
    nodes.append(node)
    node.complete(m, "config.json")
    proc = subprocess.Popen(
        warmup(node, m, extra=("--timeout", "60")),
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the progress line at the first look
        assert "warmup: " in first and "(0%), files 1/4, 5.0 MB/s, ETA" in first, first
        assert "llm fetching" in first
        node.complete(m, "model-00001-of-00002.safetensors")
        node.complete(m, "model-00002-of-00002.safetensors", "nested/extra.bin")
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert "warmup complete: 1 model(s), 4 file(s)" in rest
    assert "cache hit" not in rest


@pytest.mark.parametrize("on_failure", ["fail", "continue"])
def test_a_failed_fetch_ends_the_warmup_with_the_model_and_the_error(
    root: Path, nodes: list[Node], on_failure: str
) -> None:
    good, bad = tiny_model("base"), tiny_model("lora", "hf://acme/missing")
    node = Node(root, [good, bad])
    nodes.append(node)
    node.complete(good, *good.files)
    bad.state, bad.error = "failed", "not found (HTTP 404): check the repository name"
    node.publish()
    tlog = termination_log(root)
    done = run(
        warmup(node, good, bad, extra=("--on-failure", on_failure, "--termination-log", str(tlog)))
    )
    assert done.returncode == (1 if on_failure == "fail" else 0), done.stderr
    line = (
        "warmup failed: model 'lora' (hf://acme/missing@main): not found (HTTP 404): check the "
        "repository name"
    )
    assert line in done.stderr.splitlines()
    assert tlog.read_text().splitlines()[0] == line
    assert ("the app starts without the node cache" in done.stderr) == (on_failure == "continue")


def test_a_warmup_that_runs_out_of_time_names_the_model_and_its_progress(
    root: Path, nodes: list[Node]
) -> None:
    m = tiny_model()
    node = Node(root, [m])
    nodes.append(node)
    node.complete(m, "config.json")
    started = time.monotonic()
    done = run(warmup(node, m, extra=("--timeout", "2")))
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 30
    failed = [ln for ln in done.stderr.splitlines() if ln.startswith("warmup failed:")]
    assert len(failed) == 1, done.stderr
    assert failed[0].startswith("warmup failed: model 'llm' (hf://acme/tiny-llama@main): timed out")
    assert "27 B of" in failed[0] and "(state fetching)" in failed[0]


def test_the_warmup_waits_for_a_socket_that_appears_later(root: Path, nodes: list[Node]) -> None:
    m = tiny_model()
    node = Node(root, [m], start=False)
    nodes.append(node)
    node.complete(m, *m.files)
    proc = subprocess.Popen(
        warmup(node, m, extra=("--timeout", "60")),
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert "waiting for the node plugin: nothing listens on" in first, first
        node.start()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "warmup complete" in err


def test_no_socket_at_all_and_models_that_differ_are_clear_errors(
    root: Path, nodes: list[Node]
) -> None:
    m = tiny_model()
    node = Node(root, [m], start=False)
    nodes.append(node)
    done = run(warmup(node, m, extra=("--timeout", "1.5")))
    assert done.returncode == 1
    assert (
        f"warmup failed: no answer from the node plugin within 1.5s: nothing listens on "
        f"{node.socket}: is the csi.modelcache.io volume of kind fuse published for this pod?"
    ) in done.stderr
    node.start()
    other = Model("llm", "hf://acme/other-llama", {})
    done = run(warmup(node, other, extra=("--timeout", "10")))
    assert done.returncode == 1
    assert (
        "warmup failed: model 'llm': this pod says hf://acme/other-llama@main, the node "
        "plugin's volume says hf://acme/tiny-llama@main"
    ) in done.stderr


def test_cache_dir_flags_are_refused_in_node_mode(root: Path) -> None:
    base = [sys.executable, "-m", "sidecar", "warmup", "--node-socket", str(root / "s")]
    done = run([*base, "--model", "m=hf://a/b", "--file-root", "/srv"])
    assert done.returncode == 2
    assert "--file-root is for the --cache-dir mode" in done.stderr
    done = run([*base, "--model", "m=hf://a/b", "--cache-dir", "/var/cache/modelcache"])
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr


# ---- the sidecar ------------------------------------------------------------------------------

_OPEN = """
import hashlib, sys
try:
    with open(sys.argv[1], 'rb') as f:
        print(hashlib.sha256(f.read()).hexdigest())
except OSError as e:
    print('errno', e.errno)
"""


def mount_cmd(node: Node, models: list[Model], hub: Path, *extra: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "mount",
        "--node-socket",
        str(node.socket),
        "--mountpoint",
        str(node.target),
        "--link-root",
        str(node.view),
        "--hub-cache",
        str(hub),
        "--hub-link-root",
        "/var/run/modelcache/view",
        "--timeout",
        "60",
    ]
    for m in models:
        cmd += ["--model", m.arg]
    return cmd + list(extra)


def probe(node: Node, *names: str, wait: float = 0.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sidecar", "probe", "--mountpoint", str(node.target)]
    for n in names:
        cmd += ["--model", n]
    return node.run_in_ns([*cmd, "--wait", str(wait)], timeout=wait + 60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_sidecar_serves_the_handed_over_mount_unprivileged(
    root: Path, nodes: list[Node]
) -> None:
    m = tiny_model()
    node = Node(root, [m])
    nodes.append(node)
    node.complete(m, "config.json", "model-00001-of-00002.safetensors")
    hub = root / "hub"
    hub.mkdir(mode=0o777)
    hub.chmod(0o777)
    log_path = root / "sidecar.log"
    with open(log_path, "wb") as log:
        sidecar = subprocess.Popen(
            node.ns(mount_cmd(node, [m], hub)), env=ENV, cwd=REPO, stdout=log, stderr=log
        )
    try:
        ready = probe(node, "llm", wait=60)
        assert ready.returncode == 0, ready.stderr + log_path.read_text()
        # the hub layout is written before the view serves, at the node's commit
        repo = hub / "models--acme--tiny-llama"
        assert (repo / "refs" / "main").read_text() == COMMIT
        snap = repo / "snapshots" / COMMIT
        assert os.readlink(snap / "nested" / "extra.bin") == (
            "/var/run/modelcache/view/llm/nested/extra.bin"
        )
        assert sorted(
            p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_symlink()
        ) == sorted(m.files)

        # every file is there; the complete ones link into the view, the others are files
        look = node.run_in_ns(
            [
                sys.executable,
                "-c",
                "import json, os, sys\n"
                "r = sys.argv[1]\n"
                "out = {}\n"
                "for d, _, names in os.walk(r):\n"
                "    for n in names:\n"
                "        p = os.path.join(d, n)\n"
                "        out[os.path.relpath(p, r)] = os.readlink(p) if os.path.islink(p) "
                "else os.lstat(p).st_size\n"
                "print(json.dumps(out))",
                str(node.target / "llm"),
            ]
        )
        assert look.returncode == 0, look.stderr
        key_dir = f"{node.view}/{m.key}"
        assert json.loads(look.stdout) == {
            "config.json": f"{key_dir}/config.json",
            "model-00001-of-00002.safetensors": f"{key_dir}/model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors": 200_000,
            "nested/extra.bin": 70_000,
        }
        linked = node.run_in_ns(
            [sys.executable, "-c", _OPEN, str(node.target / "llm/model-00001-of-00002.safetensors")]
        )
        assert linked.stdout.strip() == sha(m.files["model-00001-of-00002.safetensors"])

        # an open of a file the node has not completed waits, then reads the right bytes
        shard = str(node.target / "llm/model-00002-of-00002.safetensors")
        app = subprocess.Popen(
            node.ns([sys.executable, "-c", _OPEN, shard]),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                app.wait(timeout=1.5)  # still blocked in open: the file is not complete
            node.complete(m, "model-00002-of-00002.safetensors")
            out, err = app.communicate(timeout=30)
        finally:
            if app.poll() is None:
                app.kill()
                app.communicate(timeout=30)
        assert out.strip() == sha(m.files["model-00002-of-00002.safetensors"]), err

        # the node's fetch fails: an open that waits gets EIO
        m.state, m.error = "failed", "HTTP 503 from the hub after 5 retries"
        node.publish()
        failed = node.run_in_ns(
            [sys.executable, "-c", _OPEN, str(node.target / "llm/nested/extra.bin")]
        )
        assert failed.stdout.strip() == f"errno {errno.EIO}", failed.stderr

        # SIGTERM: the sidecar exits 0 at once; the mount is the node's and stays
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait(timeout=30)
    text = log_path.read_text()
    assert "Traceback" not in text, text
    assert "leaving the FUSE connection to the node plugin" in text
    mounted = Path(f"/proc/{node.proc.pid}/mountinfo").read_text() if node.proc else ""
    assert f" {node.target} " in mounted


def test_the_probe_fails_until_the_sidecar_serves_and_unpublish_ends_it_cleanly(
    root: Path, nodes: list[Node]
) -> None:
    m = tiny_model()
    node = Node(root, [m])
    nodes.append(node)
    node.complete(m, *m.files)
    hub = root / "hub"
    hub.mkdir()
    hub.chmod(0o777)
    # the node's FUSE mount is there, but nobody serves it yet
    early = probe(node, "llm")
    assert early.returncode == 1
    assert "did not answer a listing" in early.stderr
    assert not any(hub.iterdir())

    log_path = root / "sidecar.log"
    with open(log_path, "wb") as log:
        sidecar = subprocess.Popen(
            node.ns(mount_cmd(node, [m], hub)), env=ENV, cwd=REPO, stdout=log, stderr=log
        )
    try:
        ready = probe(node, "llm", wait=60)
        assert ready.returncode == 0, ready.stderr + log_path.read_text()
        status = node.run_in_ns(["grep", "-E", "^(Uid|CapEff)", f"/proc/{sidecar.pid}/status"])
        assert f"Uid:\t{NOBODY}" in status.stdout and "CapEff:\t0000000000000000" in status.stdout
        node.unpublish()  # the kubelet unpublishes the volume: the kernel ends the connection
        assert sidecar.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait(timeout=30)
    assert "the node plugin ended the FUSE connection" in log_path.read_text()


def test_a_model_the_node_could_not_fetch_is_left_out_with_on_failure_continue(
    root: Path, nodes: list[Node]
) -> None:
    good, bad = tiny_model("base"), tiny_model("lora", "hf://acme/missing")
    node = Node(root, [good, bad])
    nodes.append(node)
    node.complete(good, *good.files)
    bad.state, bad.error = "failed", "not found (HTTP 404)"
    node.publish()
    hub = root / "hub"
    hub.mkdir()
    hub.chmod(0o777)
    log_path = root / "sidecar.log"
    with open(log_path, "wb") as log:
        sidecar = subprocess.Popen(
            node.ns(mount_cmd(node, [good, bad], hub, "--on-failure", "continue")),
            env=ENV,
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
    try:
        ready = probe(node, "base", "lora", wait=60)
        assert ready.returncode == 0, ready.stderr + log_path.read_text()
        note = node.run_in_ns(["cat", str(node.target / ".left-out" / "lora")])
        assert "the node plugin could not fetch it: not found (HTTP 404)" in note.stdout
        # the app's hub folder for it exists (writable) but holds no snapshot
        assert (hub / "models--acme--missing").is_dir()
        assert not (hub / "models--acme--missing" / "snapshots").exists()
    finally:
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(timeout=30) == 0, log_path.read_text()

    # without --on-failure continue the sidecar refuses to start
    done = node.run_in_ns(mount_cmd(node, [good, bad], hub))
    assert done.returncode == 1
    assert "mount: model lora (hf://acme/missing@main): the node plugin could not fetch it" in (
        done.stderr
    )


# ---- against the real node plugin -------------------------------------------------------------


def test_warmup_and_sidecar_against_the_real_node_plugin(root: Path) -> None:
    """``python -m sidecar csi`` driven over gRPC as the kubelet does (tests/e2e/
    test_csi_plugin.py's Plugin): a cold model behind a slow server, both volumes published
    at once; the warm-up waits for the fetch, the sidecar serves the plugin's mount."""
    from tests.e2e.test_csi_plugin import Plugin, Pod
    from tests.fixtures.modelgen import generate_model, sha256_file
    from tests.fixtures.servers import fault_server

    web_root = root / "web"
    info = generate_model(web_root / "small", total_bytes=2 << 20, shards=2, seed=21)
    plugin_root = root / "plugin"
    plugin_root.mkdir(mode=0o755)
    with fault_server(web_root) as web:
        url = f"{web}small/"
        model = Model("llm", url, {})
        plugin = Plugin(plugin_root, env={})
        try:
            pod = Pod.new("llm-0")
            attrs = {"models": f"llm={url}"}
            web.faults.delay = 0.2  # every 256 KiB waits: the fetch takes seconds
            view = plugin.request(pod, "modelcache-models", {**attrs, "kind": "view"})
            plugin.publish_once(view)  # at once: the fetch runs behind it
            sock = plugin.make_socket_volume(pod) / "socket"
            fuse = plugin.request(pod, "modelcache-fuse", {**attrs, "kind": "fuse"})
            plugin.publish_once(fuse)

            warm_cmd = [sys.executable, "-m", "sidecar", "warmup", "--node-socket", str(sock)]
            warm_cmd += ["--model", model.arg, "--timeout", "120"]
            warm = run(as_nobody(warm_cmd), timeout=180)
            web.faults.delay = 0.0
            assert warm.returncode == 0, warm.stderr + plugin.log()
            progress = [ln for ln in warm.stderr.splitlines() if "warmup: " in ln]
            assert progress and "%), files " in progress[0], warm.stderr
            assert "warmup complete: 1 model(s), " in warm.stderr
            assert "cache hit" not in warm.stderr

            cmd = [sys.executable, "-m", "sidecar", "mount", "--node-socket", str(sock)]
            cmd += ["--mountpoint", fuse.target_path, "--link-root", view.target_path]
            cmd += ["--model", model.arg]
            ns = ["nsenter", f"--target={plugin.proc.pid}", "--mount", "--"]
            log_path = root / "sidecar.log"
            with open(log_path, "wb") as log:
                sidecar = subprocess.Popen(
                    ns + as_nobody(cmd), env=ENV, cwd=REPO, stdout=log, stderr=log
                )
            try:
                probe_cmd = [sys.executable, "-m", "sidecar", "probe"]
                probe_cmd += ["--mountpoint", fuse.target_path, "--model", "llm", "--wait", "60"]
                ready = plugin.run_in_ns(probe_cmd, nobody=True, timeout=120)
                assert ready.returncode == 0, ready.stderr + log_path.read_text()
                # the app reads every file through the plugin's mount, linked into the view
                look = plugin.py_in_ns(
                    "import hashlib, json, os, sys\n"
                    "r = sys.argv[1]\n"
                    "out = {}\n"
                    "for d, _, names in os.walk(r):\n"
                    "    for n in names:\n"
                    "        p = os.path.join(d, n)\n"
                    "        out[os.path.relpath(p, r)] = [os.readlink(p), "
                    "hashlib.sha256(open(p, 'rb').read()).hexdigest()]\n"
                    "print(json.dumps(out))",
                    f"{fuse.target_path}/llm",
                    nobody=True,
                )
                want = {
                    p.relative_to(info.root).as_posix(): sha256_file(p)
                    for p in info.root.rglob("*")
                    if p.is_file() and not p.name.startswith(".")
                }
                assert json.loads(look) == {
                    rel: [f"{view.target_path}/{model.key}/{rel}", digest]
                    for rel, digest in want.items()
                }
                plugin.unpublish(fuse)  # the kernel ends the connection: a clean exit
                assert sidecar.wait(timeout=60) == 0, log_path.read_text()
            finally:
                if sidecar.poll() is None:
                    sidecar.kill()
                    sidecar.wait(timeout=30)
            assert "the node plugin ended the FUSE connection" in log_path.read_text()
            plugin.unpublish(view)
        finally:
            web.faults.delay = 0.0
            plugin.stop()
