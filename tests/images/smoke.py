"""Builds the webhook and sidecar images from scratch and runs them the way a cluster would.

    python -m tests.images.smoke          (make test-images; needs root, buildah, podman)

The images are built by scripts/build-images.sh with buildah (vfs storage, chroot isolation)
on a local Debian bookworm base made with debootstrap and from the runtime lock's wheels
downloaded on the host with their hashes checked; the base and the wheels are cached under
.build/, the image layers are not (every run builds both images from their Dockerfiles).
Each container then runs with podman, with a read-only root filesystem and nothing writable
but what the manifests mount, as the user the manifests run it as:

- webhook: the image's own user is the Deployment's runAsUser; every entry point imports;
  ``serve --dev`` answers ``/healthz`` and ``/readyz`` over verified TLS from the host through
  a published port (so it listens beyond the container's loopback); ``inject`` mutates an
  example Deployment;
- sidecar: ``--help`` lists the four roles; ``probe`` on a directory with nothing mounted
  exits 1 naming the reason; the FUSE binding loads libfuse3 and every role's module imports
  (as uid 65532 too, the unprivileged pod side); CA certificates load.

Prints one line, ``images: webhook <size> MB, sidecar <size> MB; smoke ok`` or what failed,
and exits 1 on any failure (sizes over the budget count as failures).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = ROOT / ".build"
STORAGE_ROOT = BUILD_DIR / "containers" / "storage"
# conmon's socket paths must stay short, so the run root is not under the work tree; one per
# storage root (a run root left by another checkout's storage would not match this one)
RUN_ROOT = Path(f"/run/modelcache-images-{hashlib.sha256(bytes(STORAGE_ROOT)).hexdigest()[:8]}")
BUDGET_MB = {"webhook": 150, "sidecar": 250}
#: The names the images are built under (what manifests/ and the release use).
REGISTRY = "ghcr.io/modelcache"
#: Seconds for one image build and for one container run.
BUILD_TIMEOUT = 1800
RUN_TIMEOUT = 120
#: Seconds the webhook gets to print that it serves.
SERVE_TIMEOUT = 90
UNPRIVILEGED_UID = 65532
TOOLS = ("buildah", "podman", "debootstrap")


class SmokeFailure(Exception):
    """One check failed; the message names it."""


@dataclass
class Report:
    sizes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        sizes = ", ".join(
            f"{n} {self.sizes[n]} MB" for n in ("webhook", "sidecar") if n in self.sizes
        )
        head = f"images: {sizes or 'not built'}"
        if self.failures:
            return f"{head}; smoke FAILED: " + "; ".join(self.failures)
        return f"{head}; smoke ok"


def version() -> str:
    match = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match, "no version in pyproject.toml"
    return match.group(1)


def manifest_uids() -> dict[str, int]:
    """The uid each image runs as in manifests/: the Deployment's and the agent's."""
    deployment = yaml.safe_load((ROOT / "manifests/core/deployment.yaml").read_text())
    daemonset = yaml.safe_load((ROOT / "manifests/agent/daemonset.yaml").read_text())
    agent = daemonset["spec"]["template"]["spec"]["containers"][0]
    return {
        "webhook": int(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]),
        "sidecar": int(agent["securityContext"]["runAsUser"]),
    }


def storage_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        STORAGE_DRIVER="vfs",
        CONTAINERS_ROOT=str(STORAGE_ROOT),
        CONTAINERS_RUNROOT=str(RUN_ROOT),
    )
    return env


def podman_cmd() -> list[str]:
    cmd = ["podman", "--storage-driver", "vfs", "--root", str(STORAGE_ROOT)]
    cmd += ["--runroot", str(RUN_ROOT), "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    # crun refuses hosts with hybrid cgroups (v1 controllers beside a v2 mount); runc runs there
    if shutil.which("runc"):
        cmd += ["--runtime", "runc"]
    return cmd


#: How every container runs: read-only root, no tmpfs podman would add on its own, limits
#: below the host's (raising them needs a capability the build host may not have).
RUN_FLAGS = [
    "--rm",
    "--read-only",
    "--read-only-tmpfs=false",
    "--ulimit=nofile=4096:4096",
    "--ulimit=nproc=4096:4096",
]


def run(
    cmd: Sequence[str], *, timeout: float = RUN_TIMEOUT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def build(tag: str) -> None:
    # Only the cached base and wheels survive between runs: earlier images and their layers go.
    BUILD_DIR.mkdir(exist_ok=True)
    # podman's own state (containers, not images; every container here is --rm) starts
    # afresh: it records the run root, which an earlier checkout may have had elsewhere
    shutil.rmtree(STORAGE_ROOT / "libpod", ignore_errors=True)
    env = storage_env()
    for name in ("webhook", "sidecar"):
        run(["buildah", *_storage_flags(), "rmi", "--force", f"{REGISTRY}/{name}:{tag}"])
    run(["buildah", *_storage_flags(), "rmi", "--prune"])
    env.update(ENGINE="buildah", BASE_IMAGE="debootstrap", NO_CACHE="1", REGISTRY=REGISTRY, TAG=tag)
    env.setdefault("PIP", str(ROOT / ".venv/bin/pip"))
    log = BUILD_DIR / "images-build.log"
    with log.open("w") as out:
        result = subprocess.run(
            ["sh", str(ROOT / "scripts/build-images.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    if result.returncode != 0:
        raise SmokeFailure(f"image build failed ({tail(log.read_text())}; log: {log})")


def _storage_flags() -> list[str]:
    return ["--storage-driver", "vfs", "--root", str(STORAGE_ROOT), "--runroot", str(RUN_ROOT)]


def image_size_mb(image: str) -> int:
    result = run([*podman_cmd(), "image", "inspect", "--format", "{{.Size}}", image])
    if result.returncode != 0:
        raise SmokeFailure(f"{image} not found after the build: {tail(result.stderr)}")
    return round(int(result.stdout.strip()) / 1e6)


def container(
    image: str,
    args: Sequence[str],
    *,
    user: int | None,
    entrypoint: str | None = None,
    extra: Sequence[str] = (),
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [*podman_cmd(), "run", *RUN_FLAGS, "--network=none", *extra]
    if stdin is not None:
        cmd.append("--interactive")
    if user is not None:
        cmd.append(f"--user={user}:{user}")
    if entrypoint is not None:
        cmd.append(f"--entrypoint={entrypoint}")
    return run([*cmd, image, *args], stdin=stdin)


def expect(ok: bool, what: str, result: subprocess.CompletedProcess[str]) -> None:
    if not ok:
        raise SmokeFailure(
            f"{what} (exit {result.returncode}: {tail(result.stderr or result.stdout)})"
        )


# Every module of the packages the image holds, imported by the image's own interpreter: a
# package the runtime lock lacks, a shared library the image lacks or a file a COPY missed
# fails here rather than in a pod.
IMPORT_ALL = """
import importlib, os, pkgutil, ssl, sys
names = []
for package in sys.argv[1:]:
    root = importlib.import_module(package)
    names += [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
for name in names:
    importlib.import_module(name)
assert ssl.create_default_context().cert_store_stats()["x509_ca"] > 0, "no CA certificates"
print(os.getuid(), os.getgid(), len(names))
"""

#: Beyond our packages: the FUSE binding must have found and loaded libfuse3, and the tools
#: sidecar.mount unmounts with must run.
FUSE_LOADS = """
import mfusepy, subprocess
assert "fuse3" in str(mfusepy._libfuse_path), mfusepy._libfuse_path
for tool in (["fusermount3", "-V"], ["umount", "--version"]):
    subprocess.run(tool, check=True, capture_output=True)
print(mfusepy._libfuse_path)
"""


def check_webhook(image: str, uid: int) -> None:
    # the image's own user (no --user) must be the Deployment's runAsUser
    result = container(
        image, ["-c", IMPORT_ALL, "webhook", "certs"], user=None, entrypoint="python"
    )
    expect(result.returncode == 0, "webhook: its modules do not import", result)
    expect(
        result.stdout.split()[:2] == [str(uid), str(uid)],
        f"webhook: runs as {result.stdout.strip()!r}, manifests say {uid}",
        result,
    )

    example = (ROOT / "examples/vllm.yaml").read_text()
    result = container(image, ["inject", "-f", "-"], user=None, stdin=example)
    expect(
        result.returncode == 0 and "modelcache-sidecar" in result.stdout,
        "webhook: inject did not mutate examples/vllm.yaml",
        result,
    )
    serve_dev(image)


def serve_dev(image: str) -> None:
    """``serve --dev`` in a container; /healthz and /readyz over TLS checked against its CA."""
    name = f"modelcache-smoke-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="modelcache-smoke-") as tmp:
        # /tmp is the Deployment's emptyDir: the only writable place
        os.chown(tmp, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        cmd = [*podman_cmd(), "run", *RUN_FLAGS, "--detach", f"--name={name}"]
        cmd += [f"--volume={tmp}:/tmp", "--publish=127.0.0.1::8443"]
        cmd += [image, "serve", "--dev", "--host=0.0.0.0", "--port=8443"]
        started = run(cmd)
        expect(started.returncode == 0, "webhook: serve --dev did not start", started)
        try:
            ca = wait_until_serving(name)
            port = published_port(name)
            for path in ("/healthz", "/readyz"):
                status, body = https_get(port, path, Path(tmp) / ca.relative_to("/tmp"))
                if status != 200:
                    raise SmokeFailure(f"webhook: GET {path} answered {status} {body[:80]!r}")
        finally:
            run([*podman_cmd(), "rm", "--force", "--time=5", name])


def wait_until_serving(name: str) -> Path:
    """Follows the container's output until it prints ``serving on``; returns the CA path."""
    logs = subprocess.Popen(
        [*podman_cmd(), "logs", "--follow", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # the output ends when the container exits, or when this timer ends the follower
    timer = threading.Timer(SERVE_TIMEOUT, logs.kill)
    timer.start()
    ca: Path | None = None
    seen: list[str] = []
    try:
        assert logs.stdout is not None
        for line in logs.stdout:
            seen.append(line.rstrip())
            if line.startswith("dev CA certificate: "):
                ca = Path(line.split(": ", 1)[1].strip())
            if line.startswith("serving on ") and ca is not None:
                return ca
    finally:
        timer.cancel()
        logs.kill()
        logs.wait()
    raise SmokeFailure(f"webhook: never said it serves ({' | '.join(seen[-3:]) or 'no output'})")


def published_port(name: str) -> int:
    result = run([*podman_cmd(), "port", name, "8443/tcp"])
    expect(result.returncode == 0 and ":" in result.stdout, "webhook: no published port", result)
    return int(result.stdout.strip().splitlines()[0].rsplit(":", 1)[1])


def https_get(port: int, path: str, ca_file: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # the dev certificate names localhost; the connection goes to the published port
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, ssl.SSLError) as e:
        raise SmokeFailure(f"webhook: GET {path} over TLS failed: {e}") from None
    finally:
        conn.close()


def check_sidecar(image: str, uid: int) -> None:
    result = container(image, ["--help"], user=uid)
    expect(
        result.returncode == 0
        and all(role in result.stdout for role in ("warmup", "mount", "probe", "agent")),
        "sidecar: --help does not list warmup, mount, probe and agent",
        result,
    )
    result = container(image, ["probe", "--mountpoint=/app"], user=uid)
    expect(
        result.returncode == 1
        and "/app" in result.stderr
        and "nothing is mounted" in result.stderr,
        "sidecar: probe on an unmounted directory did not fail with a reason",
        result,
    )
    for who in sorted({uid, UNPRIVILEGED_UID}):
        script = IMPORT_ALL + FUSE_LOADS
        result = container(image, ["-c", script, "sidecar"], user=who, entrypoint="python")
        expect(
            result.returncode == 0,
            f"sidecar: FUSE binding or a role does not load as uid {who}",
            result,
        )


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def main() -> int:
    report = Report()
    started = time.monotonic()
    missing = missing_tools()
    if os.geteuid() != 0:
        report.failures.append("needs root (buildah, podman and debootstrap run as root)")
    elif missing:
        report.failures.append(
            f"missing {', '.join(missing)} (sh scripts/image-deps.sh installs them)"
        )
    else:
        tag = version()
        images = {n: f"{REGISTRY}/{n}:{tag}" for n in ("webhook", "sidecar")}
        uids = manifest_uids()
        try:
            build(tag)
            for name, image in images.items():
                report.sizes[name] = image_size_mb(image)
                if report.sizes[name] > BUDGET_MB[name]:
                    report.failures.append(
                        f"{name} image is {report.sizes[name]} MB, budget {BUDGET_MB[name]} MB"
                    )
        except subprocess.TimeoutExpired as e:
            report.failures.append(f"timed out after {e.timeout:.0f} s: {' '.join(e.cmd[:3])}")
        except SmokeFailure as e:
            report.failures.append(str(e))
        else:
            for check, name in ((check_webhook, "webhook"), (check_sidecar, "sidecar")):
                try:
                    check(images[name], uids[name])
                except (SmokeFailure, subprocess.TimeoutExpired) as e:
                    report.failures.append(str(e))
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    print(report.line(), flush=True)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
