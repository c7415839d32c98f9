"""Cached files are verified again when they changed on disk: a copy damaged in place (same
size, even with its mtime put back) is detected by the next warm-up, moved to
``.quarantine/`` and fetched again, so the bytes served are the source's.

Real warm-up processes against the hub stand-in (LFS files carry sha256) and nginx (no
checksum at all: a changed copy cannot be proven intact, so it is fetched again).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sidecar.cache import NodeCache, read_file_meta
from sidecar.layout import ModelDir
from sidecar.modelsource import parse_model_arg
from tests.fixtures.servers import ServedModel, nginx_bytes_sent

REPO = Path(__file__).resolve().parents[2]


def _warmup(cache: Path, arg: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
    full.update(env, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "warmup", "--cache-dir", str(cache), "--model", arg],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damage_in_place(path: Path) -> bytes:
    """Flip bytes in the middle, keeping the size and putting the mtime back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        old = f.read(64)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    return path.read_bytes()


def test_damaged_lfs_file_is_quarantined_and_fetched_again(
    tmp_path: Path, hf_model: ServedModel
) -> None:
    cache = tmp_path / "cache"
    arg = f"llm={hf_model.url}"
    env = hf_model.server.env()
    first = _warmup(cache, arg, env)
    assert first.returncode == 0, first.stderr
    md = ModelDir(cache, parse_model_arg(arg).source.cache_key)
    shard = hf_model.info.weight_files[0]
    expected = hf_model.info.files[shard].sha256
    assert read_file_meta(md, shard)["sha256"] == expected  # type: ignore[index]

    # an untouched cache: nothing fetched, nothing quarantined
    stats = hf_model.server.stats
    before = stats.bytes_sent
    again = _warmup(cache, arg, env)
    assert again.returncode == 0, again.stderr
    assert stats.bytes_sent == before
    assert not md.quarantine_dir.exists()

    damaged = _damage_in_place(md.data / shard)
    assert hashlib.sha256(damaged).hexdigest() != expected
    before = stats.bytes_sent
    healed = _warmup(cache, arg, env)
    assert healed.returncode == 0, healed.stderr
    assert "failed verification" in healed.stderr
    assert _sha(md.data / shard) == expected  # the source's bytes again
    assert md.quarantine_file(shard).read_bytes() == damaged  # kept aside, never in data/
    # only the damaged file was fetched again (plus the listing)
    size = hf_model.info.files[shard].size
    assert size <= stats.bytes_sent - before < size + (64 << 10)
    for rel, gen in hf_model.info.files.items():
        assert _sha(md.data / rel) == gen.sha256, rel


def test_changed_file_without_a_source_checksum_is_fetched_again(
    tmp_path: Path, nginx_model: ServedModel
) -> None:
    cache = tmp_path / "cache"
    arg = f"llm={nginx_model.url}"
    assert _warmup(cache, arg, {}).returncode == 0
    md = ModelDir(cache, parse_model_arg(arg).source.cache_key)
    shard = nginx_model.info.weight_files[-1]
    _damage_in_place(md.data / shard)
    started = time.time()
    healed = _warmup(cache, arg, {})
    assert healed.returncode == 0, healed.stderr
    assert "no sha256 to prove it intact" in healed.stderr
    assert _sha(md.data / shard) == nginx_model.info.files[shard].sha256
    sent = nginx_bytes_sent(nginx_model.server, started_after=started)
    assert sent == nginx_model.info.files[shard].size  # that file only


async def test_file_cached_before_stamps_is_adopted_or_hashed_once(tmp_path: Path) -> None:
    """Upgrading keeps a cache: a file whose meta has no stamp yet is not fetched again."""
    from sidecar.sources import RemoteFile

    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "w.bin").write_bytes(b"w" * 1000)
    good = hashlib.sha256(b"w" * 1000).hexdigest()
    m = parse_model_arg(f"m=file://{src_dir}")
    cache = NodeCache(tmp_path / "cache")
    from sidecar.sources import open_source

    src = open_source(m, file_roots=[src_dir])
    [f] = await src.list_files()
    path = await cache.ensure_file(m, src, RemoteFile(f.path, f.size, good))
    md = cache.model_dir(m)
    meta = read_file_meta(md, f.path)
    assert meta is not None
    del meta["stamp"]
    md.file_meta(f.path).write_text(json.dumps(meta))  # as an older version left it
    ino = path.stat().st_ino
    assert await cache.ensure_file(m, src, RemoteFile(f.path, f.size, good)) == path
    assert path.stat().st_ino == ino  # hashed, found intact, not fetched again
    assert read_file_meta(md, f.path)["stamp"][0] == ino  # type: ignore[index]
    assert not md.quarantine_dir.exists()


def test_mount_serves_the_sources_bytes_after_damage_in_place(
    tmp_path: Path, fuse_available: None, sidecar_mount: object
) -> None:
    """A sidecar started on a complete model whose file was damaged (no warm-up in between)
    verifies the file on first open and serves the source's bytes, not the damaged ones."""
    from tests.fixtures.modelgen import generate_model

    info = generate_model(tmp_path / "src" / "llm", total_bytes=300_000, shards=2, seed=11)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = f"llm=file://{info.root}"
    warm = subprocess.run(
        [
            *(sys.executable, "-m", "sidecar", "warmup", "--cache-dir", str(cache)),
            *("--model", arg, "--file-root", str(info.root)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert warm.returncode == 0, warm.stderr
    md = ModelDir(cache, parse_model_arg(arg).source.cache_key)
    shard = info.weight_files[0]
    damaged = _damage_in_place(md.data / shard)

    mount = sidecar_mount(cache, mnt, [arg], "--link-root", "cache")  # type: ignore[operator]
    mount.wait_ready(["llm"])
    assert _sha(mnt / "llm" / shard) == info.files[shard].sha256
    assert md.quarantine_file(shard).read_bytes() == damaged
    other = info.weight_files[1]
    assert _sha(mnt / "llm" / other) == info.files[other].sha256  # untouched: served as is
    assert mount.stop() == 0
