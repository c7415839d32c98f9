"""Dockerfiles, the runtime lock, the image build script and the release workflow.

No container engine needed: `make test-images` (tests/images/smoke.py) builds and runs the
images themselves.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.fixtures.kustomize import render

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"webhook": ROOT / "Dockerfile.webhook", "sidecar": ROOT / "Dockerfile.sidecar"}
PINNED_BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")
RUNTIME_LOCK = ROOT / "requirements-runtime.lock"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def text(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        elif op == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            assert stages, f"{path}: {op} before FROM"
            stages[-1].instructions.append((op, rest))
    return args, stages


@pytest.fixture(params=list(DOCKERFILES))
def image(request):
    return request.param, *parse_dockerfile(DOCKERFILES[request.param])


def test_multi_stage_on_a_base_given_as_build_argument_with_a_pinned_default(image):
    _, args, stages = image
    assert PINNED_BASE.match(args["BASE_IMAGE"]), args
    assert len(stages) >= 3
    # build and runtime stages run on the base; the image itself starts from nothing and
    # receives the root filesystem the runtime stage assembled
    for s in stages[:-1]:
        assert s.base == args["BASE_IMAGE"], f"stage {s.name} is not FROM ${{BASE_IMAGE}}"
    final = stages[-1]
    assert final.name == "final" and final.base == "scratch"
    assert final.text("COPY") == ["--from=runtime /rootfs /"]
    runtime = next(s for s in stages if s.name == "runtime")
    assert any("image-rootfs.sh /rootfs" in r for r in runtime.text("RUN"))


def test_installs_only_the_hash_locked_runtime_wheels_in_the_build_stage(image):
    _, _, stages = image
    build, final = stages[0], stages[-1]
    installs = [r for r in build.text("RUN") if "pip install" in r]
    assert len(installs) == 1
    assert "--require-hashes" in installs[0] and "requirements-runtime.lock" in installs[0]
    assert "--only-binary=:all:" in installs[0]
    # offline when the host downloaded the wheels: no index, the same hashes checked again
    assert "--no-index --find-links /tmp/install" in installs[0]
    assert any(
        c.startswith("requirements-runtime.lock .build/wheel[s] ") for c in build.text("COPY")
    )
    later_runs = " ".join(r for s in stages[1:] for r in s.text("RUN"))
    assert "pip" not in later_runs
    for tool in ("gcc", "build-essential", "git", "curl"):
        assert tool not in later_runs
    assert not final.text("RUN")
    # the runtime stage takes the venv and our code from the build stage, nothing else
    runtime = stages[-2]
    venv_copies = [c for c in runtime.text("COPY") if not c.startswith("scripts/")]
    assert venv_copies and all(c.startswith(f"--from={build.name} ") for c in venv_copies)


def test_webhook_runs_as_the_numeric_user_the_deployment_requires():
    _, stages = parse_dockerfile(DOCKERFILES["webhook"])
    users = stages[-1].text("USER")
    assert len(users) == 1
    uid, gid = (int(x) for x in users[0].split(":"))
    deployment = next(o for o in render(ROOT / "manifests") if o["kind"] == "Deployment")
    pod_sc = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (uid, gid) == (pod_sc["runAsUser"], pod_sc["runAsGroup"])
    assert uid != 0


def test_webhook_image_holds_every_sidecar_module_the_webhook_imports():
    _, stages = parse_dockerfile(DOCKERFILES["webhook"])
    copied = " ".join(stages[0].text("COPY"))
    imported = set()
    for py in (ROOT / "webhook").rglob("*.py"):
        imported |= set(re.findall(r"^\s*from sidecar\.(\w+)", py.read_text(), re.M))
    for module in sorted(imported):
        assert f"sidecar/{module}.py" in copied or "COPY sidecar " in copied, module
    assert "COPY webhook /app/webhook" in "COPY " + " COPY ".join(stages[0].text("COPY"))
    assert "certs /app/certs" in copied


def test_sidecar_image_has_fuse3_and_runs_the_sidecar():
    _, stages = parse_dockerfile(DOCKERFILES["sidecar"])
    runtime, final = stages[-2], stages[-1]
    runs = runtime.text("RUN")
    assert any("apt-get install" in r and " fuse3" in r for r in runs)
    # fusermount3 and the library the FUSE binding loads go into the image's root filesystem
    assert any(
        "image-rootfs.sh /rootfs" in r
        and "fusermount3" in r
        and "umount" in r
        and "libfuse3.so.3" in r
        for r in runs
    )
    assert final.text("ENTRYPOINT") == ['["python", "-m", "sidecar"]']
    assert not final.text("USER"), (
        "the agent runs as root (manifests/agent); the pod side sets its user"
    )


def _pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_lock_is_the_runtime_part_of_the_dev_lock():
    runtime = _pins(RUNTIME_LOCK)
    dev = _pins(ROOT / "requirements.lock")
    assert runtime, "requirements-runtime.lock has no pins"
    for name, version in runtime.items():
        assert dev.get(name) == version, f"{name}: runtime {version}, dev lock {dev.get(name)}"
    text = RUNTIME_LOCK.read_text()
    assert text.count("--hash=sha256:") >= len(runtime)
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps_block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S)
    assert deps_block is not None
    wanted = {
        _norm(re.split(r"[<>=\[ ]", d)[0]) for d in re.findall(r'"([^"]+)"', deps_block.group(1))
    }
    have = {_norm(n) for n in runtime}
    assert wanted <= have
    assert not {"pytest", "ruff", "mypy", "hypothesis", "moto"} & have


def test_dockerignore_lets_every_copy_source_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for path in DOCKERFILES.values():
        for stage in parse_dockerfile(path)[1]:
            for copy in stage.text("COPY"):
                if copy.startswith("--from="):
                    continue
                for src in copy.split()[:-1]:
                    # a bracket makes a source optional (the wheels exist only after a download)
                    source = re.sub(r"\[(\w)\]", r"\1", src)
                    assert any(source == a or source.startswith(a + "/") for a in allowed), src
                    assert (ROOT / source).exists() or source != src, src


def _fake_engine(tmp_path: Path, info_ok: bool) -> tuple[dict[str, str], Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    fake = bindir / "docker"
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = info ] && exit {0 if info_ok else 1}\nexit 0\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE", "REGISTRY", "TAG")}
    env["PATH"] = f"{bindir}:/usr/bin:/bin"
    return env, log


def _run_build_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ROOT / "scripts" / "build-images.sh")],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_build_script_without_a_running_engine_says_so_and_fails(tmp_path):
    env, log = _fake_engine(tmp_path, info_ok=False)
    env["ENGINE"] = "docker"
    result = _run_build_script(env)
    assert result.returncode == 1
    assert "no container engine" in result.stderr
    assert "build" not in log.read_text()


def test_build_script_builds_both_images_with_the_manifest_tags(tmp_path):
    env, log = _fake_engine(tmp_path, info_ok=True)
    env["ENGINE"] = "docker"
    result = _run_build_script(env)
    assert result.returncode == 0, result.stderr
    builds = [line.split() for line in log.read_text().splitlines() if line.startswith("build")]
    tags = {b[b.index("-t") + 1]: b[b.index("-f") + 1] for b in builds}
    objs = render(ROOT / "manifests")
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    config = yaml.safe_load(
        next(o for o in objs if o["kind"] == "ConfigMap")["data"]["config.yaml"]
    )
    webhook_image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert tags == {
        webhook_image: "Dockerfile.webhook",
        config["sidecarImage"]: "Dockerfile.sidecar",
    }


# ---- what the release workflow publishes is what manifests/ installs --------------------------

RELEASE = ROOT / ".github" / "workflows" / "release.yml"


def _version() -> str:
    match = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match
    return match.group(1)


def _release() -> dict:
    workflow = yaml.safe_load(RELEASE.read_text())
    # PyYAML reads the bare key `on` as True
    workflow["on"] = workflow.pop(True, workflow.get("on"))
    return workflow


def _push_step(job: dict) -> dict:
    pushes = [s for s in job["steps"] if "build-push-action" in s.get("uses", "")]
    return next(s for s in pushes if s["with"].get("push") is True)


def _published() -> set[str]:
    workflow = _release()
    job = workflow["jobs"]["images"]
    push = _push_step(job)
    tags = push["with"]["tags"]
    names = job["strategy"]["matrix"]["image"]
    published = set()
    for name in names:
        tag = tags.replace("${{ env.REGISTRY }}", workflow["env"]["REGISTRY"])
        tag = tag.replace("${{ matrix.image }}", name)
        published.add(tag.replace("${{ steps.version.outputs.version }}", _version()))
    return published


def _manifest_images() -> dict[str, str]:
    """Every image reference in manifests/ (container images and the config's sidecarImage)."""
    found: dict[str, str] = {}

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str):
                    found[value] = where
                elif key == "config.yaml" and isinstance(value, str):
                    walk(yaml.safe_load(value), where)
                elif key == "sidecarImage":
                    found[value] = where
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in sorted((ROOT / "manifests").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            walk(doc, str(path.relative_to(ROOT)))
    return found


def test_release_publishes_both_images_for_amd64_and_arm64_on_a_version_tag():
    workflow = _release()
    assert workflow["on"] == {"push": {"tags": ["v*"]}}
    job = workflow["jobs"]["images"]
    assert sorted(job["strategy"]["matrix"]["image"]) == ["sidecar", "webhook"]
    push = _push_step(job)
    assert push["with"]["file"] == "Dockerfile.${{ matrix.image }}"
    assert push["with"]["push"] is True
    assert set(workflow["env"]["PLATFORMS"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert push["with"]["platforms"] == "${{ env.PLATFORMS }}"
    assert any("setup-qemu-action" in s.get("uses", "") for s in job["steps"])
    # the image is built and run before the step that pushes
    steps = job["steps"]
    tried = next(
        i
        for i, s in enumerate(steps)
        if "build-push-action" in s.get("uses", "") and s["with"].get("load") is True
    )
    ran = next(i for i, s in enumerate(steps) if "docker run" in s.get("run", ""))
    assert tried < ran < steps.index(push)
    # a tag that is not v<pyproject version> publishes nothing
    check = next(s for s in job["steps"] if s.get("id") == "version")
    assert '"v$version" != "$GITHUB_REF_NAME"' in check["run"] and "exit 1" in check["run"]
    assert workflow["permissions"]["packages"] == "write"


#: images of other projects the manifests use (pinned tags)
THIRD_PARTY_IMAGES = re.compile(
    r"^registry\.k8s\.io/sig-storage/csi-node-driver-registrar:v\d+\.\d+\.\d+$"
)


def test_manifests_name_exactly_the_images_the_release_publishes():
    published = _published()
    images = {
        i: where for i, where in _manifest_images().items() if not THIRD_PARTY_IMAGES.match(i)
    }
    assert len(images) < len(_manifest_images()), "the node-driver-registrar image is named"
    assert images, "no image references found in manifests/"
    for image, where in images.items():
        assert image in published, f"{where}: {image} is not published by {RELEASE.name}"
    # both images are used: the webhook (Deployment, certs-install) and the sidecar (config,
    # agent DaemonSet)
    assert set(images) == published


def test_build_script_push_pushes_what_it_built_to_the_given_registry(tmp_path):
    env, log = _fake_engine(tmp_path, info_ok=True)
    env.update(ENGINE="docker", REGISTRY="registry.example.com/mirror/")
    result = subprocess.run(
        ["sh", str(ROOT / "scripts" / "build-images.sh"), "push"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = [line.split() for line in log.read_text().splitlines()]
    built = [c[c.index("-t") + 1] for c in calls if c[0] == "build"]
    pushed = [c[1] for c in calls if c[0] == "push"]
    version = _version()
    expected = [f"registry.example.com/mirror/{n}:{version}" for n in ("webhook", "sidecar")]
    assert built == expected and pushed == expected
    # the push comes after both builds
    assert [c[0] for c in calls if c[0] in ("build", "push")] == ["build", "build", "push", "push"]


def test_build_script_rejects_an_unknown_command():
    result = subprocess.run(
        ["sh", str(ROOT / "scripts" / "build-images.sh"), "publish"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr and "push" in result.stderr


def test_ci_builds_and_smoke_runs_the_images_after_the_test_suite():
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "make test" in commands and "make test-images" in commands
    assert commands.index("make test") < commands.index("make test-images")
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test-images:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    assert "scripts/image-deps.sh" in recipe.group(1)
    assert "tests.images.smoke" in recipe.group(1)
