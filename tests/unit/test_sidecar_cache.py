"""The node cache: verified atomic files, retries, resume, single-flight, locks, full disk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cache import CacheError, NodeCache
from sidecar.modelsource import NamedModel, parse_model_arg
from sidecar.sources import RemoteFile, SourceUnavailableError, open_source
from sidecar.sources.http import HttpSource
from tests.fixtures.modelgen import ModelInfo
from tests.fixtures.servers import ServedModel
from tests.fixtures.tmpfs import small_tmpfs

PART = 64 << 10  # small parts so a few MiB exercise many ranged reads


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shard(info: ModelInfo) -> RemoteFile:
    path = info.weight_files[0]
    return RemoteFile(path, info.files[path].size, info.files[path].sha256)


def _model(served: ServedModel) -> NamedModel:
    return parse_model_arg(f"m={served.url}")


async def _ensure(cache: NodeCache, served: ServedModel, f: RemoteFile, **kw: object) -> Path:
    m = _model(served)
    src = open_source(m)
    try:
        await src.list_files()
        return await cache.ensure_file(m, src, f, **kw)  # type: ignore[arg-type]
    finally:
        await src.aclose()


def _visible(cache: NodeCache, m: NamedModel) -> list[str]:
    md = cache.model_dir(m)
    return sorted(p.relative_to(md.data).as_posix() for p in md.data.rglob("*") if p.is_file())


async def test_file_is_verified_and_renamed_into_data(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    cache = NodeCache(tmp_path, part_size=PART)
    f = _shard(faulty_model.info)
    seen: list[int] = []
    path = await _ensure(cache, faulty_model, f, parallel=4, on_bytes=seen.append)
    assert path == cache.model_dir(_model(faulty_model)).data / f.path
    assert _sha(path) == f.sha256
    assert sum(seen) == f.size
    md = cache.model_dir(_model(faulty_model))
    assert list(md.partial_dir.iterdir()) == []
    assert json.loads(md.source_file.read_text())["uri"] == _model(faulty_model).source.uri
    # a second call finds it complete and fetches nothing
    before = faulty_model.server.stats.bytes_sent
    assert await _ensure(cache, faulty_model, f) == path
    assert faulty_model.server.stats.bytes_sent == before


@pytest.mark.parametrize(
    "faults",
    [
        {"fail_first": 3},
        {"fail_first": 2, "fail_status": 502},
        {"drop_first": 3, "drop_after": 10_000},
        {"short_first": 3},
        {"fail_first": 1, "drop_first": 1, "short_first": 1, "drop_after": 1000},
    ],
    ids=["503", "502", "drop", "short-body", "mixed"],
)
async def test_transient_faults_are_retried_without_refetching(
    tmp_path: Path, faulty_model: ServedModel, faults: dict[str, int]
) -> None:
    server = faulty_model.server
    for k, v in faults.items():
        setattr(server.faults, k, v)
    cache = NodeCache(tmp_path, part_size=PART, backoff=0.01)
    f = _shard(faulty_model.info)
    path = await _ensure(cache, faulty_model, f, parallel=4)
    assert _sha(path) == f.sha256
    stats = server.stats
    assert stats.failed + stats.dropped + stats.shortened == sum(
        v for k, v in faults.items() if k.endswith("_first")
    )
    # bytes that arrived before a fault are kept: the retry asks only for the rest
    assert stats.bytes_sent == f.size


async def test_retries_are_bounded_then_a_clear_error(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    faulty_model.server.faults.fail_first = 1000
    cache = NodeCache(tmp_path, part_size=PART, retries=3, backoff=0.01)
    f = _shard(faulty_model.info)
    with pytest.raises(SourceUnavailableError, match=r"giving up on .* after 3 retries.*503"):
        await _ensure(cache, faulty_model, f, parallel=2)
    assert _visible(cache, _model(faulty_model)) == []


async def test_stalled_source_times_out_and_fails(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    faulty_model.server.faults.delay = 2.0
    cache = NodeCache(tmp_path, part_size=PART, retries=1, backoff=0.01)
    m = _model(faulty_model)
    src = HttpSource(faulty_model.url, read_timeout=0.2)
    f = _shard(faulty_model.info)
    try:
        with pytest.raises(SourceUnavailableError, match=r"after 1 retries.*Timeout"):
            await cache.ensure_file(m, src, f, parallel=1)
    finally:
        await src.aclose()
    assert _visible(cache, m) == []


async def test_slow_source_within_the_timeout_completes(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    faulty_model.server.faults.delay = 0.01
    faulty_model.server.faults.chunk = 64 << 10
    cache = NodeCache(tmp_path, part_size=256 << 10)
    f = _shard(faulty_model.info)
    assert _sha(await _ensure(cache, faulty_model, f, parallel=8)) == f.sha256


async def test_sha256_mismatch_discards_the_download(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    cache = NodeCache(tmp_path, part_size=PART)
    good = _shard(faulty_model.info)
    bad = RemoteFile(good.path, good.size, "0" * 64)
    with pytest.raises(CacheError, match="sha256 mismatch"):
        await _ensure(cache, faulty_model, bad)
    md = cache.model_dir(_model(faulty_model))
    assert _visible(cache, _model(faulty_model)) == []
    assert list(md.partial_dir.iterdir()) == []


async def test_interrupted_download_resumes_with_only_missing_parts(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    server = faulty_model.server
    server.faults.delay = 0.002
    server.faults.chunk = 16 << 10
    m = _model(faulty_model)
    f = _shard(faulty_model.info)
    cache = NodeCache(tmp_path, part_size=PART)
    state = cache.model_dir(m).partial_state(f.path)
    task = asyncio.create_task(_ensure(cache, faulty_model, f, parallel=2))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if len(json.loads(state.read_text())["done"]) >= 4:
                break
        await asyncio.sleep(0.01)
    server.faults.delay = 1.0  # stall what is in flight so the download cannot finish now
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert _visible(cache, m) == []
    recorded = json.loads(state.read_text())["done"]
    assert len(recorded) >= 4
    kept = sum(min(PART, f.size - i * PART) for i in recorded)
    server.faults.delay = 0
    seen: list[int] = []
    cache2 = NodeCache(tmp_path, part_size=PART)
    path = await _ensure(cache2, faulty_model, f, parallel=4, on_bytes=seen.append)
    assert _sha(path) == f.sha256
    # resumed: exactly the parts not recorded as written were fetched again
    assert sum(seen) == f.size - kept


async def test_partial_of_another_version_is_discarded(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    m = _model(faulty_model)
    f = _shard(faulty_model.info)
    cache = NodeCache(tmp_path, part_size=PART)
    md = cache.prepare_model(m)
    # a partial claiming every part is done, but of other content (another version)
    md.partial_file(f.path).write_bytes(b"\0" * f.size)
    md.partial_state(f.path).write_text(
        json.dumps(
            {
                "path": f.path,
                "size": f.size,
                "sha256": f.sha256,
                "version": "stale",
                "part_size": PART,
                "done": list(range(-(-f.size // PART))),
            }
        )
    )
    path = await _ensure(cache, faulty_model, f)
    assert _sha(path) == f.sha256
    assert faulty_model.server.stats.bytes_sent == f.size


async def test_concurrent_requests_in_one_process_fetch_once(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    m = _model(faulty_model)
    f = _shard(faulty_model.info)
    src = open_source(m)
    try:
        await src.list_files()
        caches = [NodeCache(tmp_path, part_size=PART) for _ in range(3)]
        paths = await asyncio.gather(*(c.ensure_file(m, src, f) for c in caches for _ in range(3)))
    finally:
        await src.aclose()
    assert len(set(paths)) == 1
    assert _sha(paths[0]) == f.sha256
    assert faulty_model.server.stats.bytes_sent == f.size


async def test_local_source_copies_in_kernel(tmp_path: Path, generated_model: ModelInfo) -> None:
    m = parse_model_arg(f"m=file://{generated_model.root}")
    src = open_source(m, file_roots=[generated_model.root])
    cache = NodeCache(tmp_path, part_size=PART)
    files = await src.list_files()
    for f in files:
        p = await cache.ensure_file(m, src, f)
        assert _sha(p) == generated_model.files[f.path].sha256


def test_manifest_only_for_complete_files(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    m = parse_model_arg("m=http://example.invalid/x/")
    md = cache.prepare_model(m)
    files = [RemoteFile("a.json", 2), RemoteFile("w/b.bin", 3, "ab" * 32)]
    with pytest.raises(CacheError, match=r"2 file\(s\) are not complete"):
        cache.write_manifest(m, files)
    assert cache.read_manifest(m) is None
    (md.data / "a.json").write_bytes(b"{}")
    (md.data / "w").mkdir()
    (md.data / "w" / "b.bin").write_bytes(b"abc")
    cache.write_manifest(m, files)
    manifest = cache.read_manifest(m)
    assert manifest is not None
    assert manifest["total_bytes"] == 5
    assert manifest["files"][1] == {"path": "w/b.bin", "size": 3, "sha256": "ab" * 32}
    assert cache.is_complete(m)
    (md.data / "w" / "b.bin").unlink()
    assert not cache.is_complete(m)
    assert [p.name for p in md.root.iterdir() if p.name.endswith(".tmp")] == []


def test_hold_shared_exclusive_and_missing(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    m = parse_model_arg("m=http://example.invalid/x/")
    with cache.hold(m.source.cache_key, exclusive=True, blocking=False) as got:
        assert got is False  # nothing to evict: not created by an exclusive hold
    assert not cache.model_dir(m).root.exists()
    with cache.hold(m) as a, cache.hold(m) as b:
        assert a and b
        with cache.hold(m, exclusive=True, blocking=False) as ex:
            assert ex is False
        # another process sees the same
        probe = subprocess.run(
            [
                "python3",
                "-c",
                "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR)\n"
                "try: fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)\n"
                "except BlockingIOError: sys.exit(3)",
                str(cache.model_dir(m).model_lock),
            ],
            check=False,
        )
        assert probe.returncode == 3
    with cache.hold(m, exclusive=True, blocking=False) as ex:
        assert ex is True


def test_touch_marks_last_used(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    m = parse_model_arg("m=http://example.invalid/x/")
    cache.prepare_model(m)
    last = cache.model_dir(m).last_used
    cache.touch(m)
    os.utime(last, (1000, 1000))
    cache.touch(m)
    assert last.stat().st_mtime > 1000


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk."""
    with small_tmpfs(tmp_path / "tiny", "2m") as mnt:
        yield mnt


async def test_full_disk_is_a_clear_error_and_leaves_nothing(
    tiny_fs: Path, faulty_model: ServedModel
) -> None:
    cache = NodeCache(tiny_fs, part_size=PART)
    m = _model(faulty_model)
    f = _shard(faulty_model.info)
    assert f.size > 2 << 20
    with pytest.raises(CacheError, match="no space left in the node cache"):
        await _ensure(cache, faulty_model, f)
    md = cache.model_dir(m)
    assert _visible(cache, m) == []
    assert list(md.partial_dir.iterdir()) == []


async def test_waiter_takes_over_when_the_fetching_call_is_cancelled(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    faulty_model.server.faults.delay = 0.05
    m = _model(faulty_model)
    f = _shard(faulty_model.info)
    src = open_source(m)
    cache = NodeCache(tmp_path, part_size=PART)
    try:
        await src.list_files()
        owner = asyncio.create_task(cache.ensure_file(m, src, f))
        await asyncio.sleep(0)  # let the owner register as the in-flight fetch
        waiter = asyncio.create_task(cache.ensure_file(m, src, f))
        await asyncio.sleep(0)
        owner.cancel()
        faulty_model.server.faults.delay = 0
        path = await asyncio.wait_for(waiter, 60)
    finally:
        await src.aclose()
    assert owner.cancelled()
    assert _sha(path) == f.sha256


async def test_empty_file_is_cached(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.txt").write_bytes(b"")
    m = parse_model_arg(f"m=file://{tmp_path / 'src'}")
    src = open_source(m, file_roots=[tmp_path / "src"])
    cache = NodeCache(tmp_path / "cache")
    [f] = await src.list_files()
    path = await cache.ensure_file(m, src, RemoteFile(f.path, 0, hashlib.sha256().hexdigest()))
    assert path.read_bytes() == b""
    assert cache.is_file_complete(m, f)
