"""Tenant isolation on the node cache, tried as an attacker would: real warm-up and mount
processes, a private model fetched from the hub stand-in (token required) into a shared cache,
then a pod of another tenant asking for those cached bytes through a local source.

Every test here failed before the fix it covers: the cached copy was readable through
``file://<cache>/models/<key>/data``, and a symlink in the attacker's own ``pvc://`` source
pointing into the cache was followed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.layout import ModelDir
from sidecar.modelsource import parse_model_arg
from tests.fixtures.servers import ServedModel

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env or _env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def victim_cache(tmp_path: Path, hf_model: ServedModel) -> tuple[Path, ModelDir]:
    """A node cache holding the private hub model, warmed by its owner with the token."""
    cache = tmp_path / "cache"
    done = _sidecar(
        "warmup",
        "--cache-dir",
        str(cache),
        "--model",
        f"llm={hf_model.url}",
        env=_env(**hf_model.server.env()),
    )
    assert done.returncode == 0, done.stderr
    mdir = ModelDir(cache, parse_model_arg(f"llm={hf_model.url}").source.cache_key)
    assert (mdir.data / "config.json").is_file()
    return cache, mdir


def _private_hashes(mdir: ModelDir) -> set[str]:
    return {_sha(p) for p in mdir.data.rglob("*") if p.is_file()}


def _stolen(cache: Path, arg: str, private: set[str]) -> list[str]:
    """Files of the attacker's model directory whose bytes are the victim's."""
    root = ModelDir(cache, parse_model_arg(arg).source.cache_key).root
    if not root.exists():
        return []
    return [str(p) for p in root.rglob("*") if p.is_file() and _sha(p) in private]


def test_file_uri_into_the_cache_is_refused(
    tmp_path: Path, victim_cache: tuple[Path, ModelDir]
) -> None:
    cache, victim = victim_cache
    private = _private_hashes(victim)
    steal = f"steal=file://{victim.data}"

    # no --file-root configured (the default): every file:// source is refused
    done = _sidecar("warmup", "--cache-dir", str(cache), "--model", steal)
    assert done.returncode == 1
    assert "file:// sources are not allowed on this node (no --file-root" in done.stderr
    assert _stolen(cache, steal, private) == []

    # an admin root that happens to contain the cache still never hands the cache out
    done = _sidecar("warmup", "--cache-dir", str(cache), "--model", steal, "--file-root", "/")
    assert done.returncode == 1
    assert f"overlaps the node cache {cache}" in done.stderr
    assert _stolen(cache, steal, private) == []

    # nor does a symlink under an allowed root that leads into the cache
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "shortcut").symlink_to(victim.data)
    via_link = f"steal=file://{allowed / 'shortcut'}"
    done = _sidecar(
        "warmup", "--cache-dir", str(cache), "--model", via_link, "--file-root", str(allowed)
    )
    assert done.returncode == 1
    assert f"(really {victim.data}) is outside the allowed --file-root" in done.stderr
    assert _stolen(cache, via_link, private) == []

    # the mount role refuses it the same way, before serving anything
    mnt = tmp_path / "mnt"
    done = _sidecar("mount", "--cache-dir", str(cache), "--mountpoint", str(mnt), "--model", steal)
    assert done.returncode == 1
    assert "file:// sources are not allowed" in done.stderr
    assert _stolen(cache, steal, private) == []


def test_file_uri_under_a_configured_root_is_read(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    (root / "m" / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    arg = f"m=file://{root / 'm'}"
    outside = _sidecar("warmup", "--cache-dir", str(cache), "--model", arg, "--file-root", "/srv")
    assert outside.returncode == 1
    assert f"{root / 'm'} is outside the allowed --file-root (/srv)" in outside.stderr
    done = _sidecar("warmup", "--cache-dir", str(cache), "--model", arg, "--file-root", str(root))
    assert done.returncode == 0, done.stderr
    data = ModelDir(cache, parse_model_arg(arg).source.cache_key).data
    assert (data / "config.json").read_text() == "{}"


@pytest.mark.parametrize("link", ["file", "directory"])
def test_symlink_out_of_a_pvc_source_is_refused(
    tmp_path: Path, victim_cache: tuple[Path, ModelDir], link: str
) -> None:
    cache, victim = victim_cache
    private = _private_hashes(victim)
    shard = next(p for p in sorted(victim.data.rglob("*.safetensors")))
    claim = tmp_path / "pvc" / "mine"
    claim.mkdir(parents=True)
    (claim / "config.json").write_text('{"architectures": ["Evil"]}')
    if link == "file":
        (claim / "model.safetensors").symlink_to(shard)
    else:
        (claim / "weights").symlink_to(victim.data)
    arg = "evil=pvc://mine"
    done = _sidecar(
        "warmup", "--cache-dir", str(cache), "--model", arg, "--pvc-root", str(tmp_path / "pvc")
    )
    assert done.returncode == 1
    name = "model.safetensors" if link == "file" else "weights"
    assert f"{name} is a symlink to" in done.stderr
    assert "outside the source" in done.stderr
    assert _stolen(cache, arg, private) == []


def test_symlinks_inside_a_pvc_source_are_followed(tmp_path: Path) -> None:
    claim = tmp_path / "pvc" / "mine"
    (claim / "blobs").mkdir(parents=True)
    (claim / "blobs" / "abc").write_bytes(b"w" * 1000)
    (claim / "model.bin").symlink_to("blobs/abc")
    (claim / "again").symlink_to("blobs")
    (claim / "loop").mkdir()
    cache = tmp_path / "cache"
    arg = "m=pvc://mine"
    done = _sidecar(
        "warmup", "--cache-dir", str(cache), "--model", arg, "--pvc-root", str(tmp_path / "pvc")
    )
    assert done.returncode == 0, done.stderr
    data = ModelDir(cache, parse_model_arg(arg).source.cache_key).data
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert files == ["again/abc", "blobs/abc", "model.bin"]
    assert (data / "model.bin").read_bytes() == b"w" * 1000
    assert not (data / "model.bin").is_symlink()

    # a symlink back up the tree is a loop: refused, not walked forever
    (claim / "loop" / "up").symlink_to("..")
    done = _sidecar(
        "warmup", "--cache-dir", str(cache), "--model", arg, "--pvc-root", str(tmp_path / "pvc")
    )
    assert done.returncode == 1
    assert "loop/up is a symlink loop" in done.stderr
