"""Dockerfiles, the runtime lock and the image build script (no container engine needed)."""

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


def test_multi_stage_with_a_pinned_base(image):
    _, _, stages = image
    assert len(stages) >= 2
    for s in stages:
        assert PINNED_BASE.match(s.base), f"base {s.base!r} is not an exact python 3.11 tag"
    assert stages[-1].name == "final"


def test_installs_only_the_hash_locked_runtime_wheels_in_the_build_stage(image):
    _, _, stages = image
    build, final = stages[0], stages[-1]
    installs = [r for r in build.text("RUN") if "pip install" in r]
    assert len(installs) == 1
    assert "--require-hashes" in installs[0] and "requirements-runtime.lock" in installs[0]
    assert "--only-binary=:all:" in installs[0]
    final_runs = " ".join(final.text("RUN"))
    assert "pip" not in final_runs
    for tool in ("gcc", "build-essential", "git", "curl"):
        assert tool not in final_runs
    # the final stage takes the venv and our code from the build stage, nothing from context
    copies = final.text("COPY")
    assert copies and all(c.startswith(f"--from={build.name} ") for c in copies)


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
    final = stages[-1]
    assert any("apt-get install" in r and " fuse3" in r for r in final.text("RUN"))
    assert any("rm -rf /var/lib/apt/lists" in r for r in final.text("RUN"))
    assert final.text("ENTRYPOINT") == ['["python", "-m", "sidecar"]']


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
                    assert any(src == a or src.startswith(a + "/") for a in allowed), src
                    assert (ROOT / src).exists(), src


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
