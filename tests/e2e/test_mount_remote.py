"""The mount over remote sources: a real nginx, a slow nginx, a refusing server."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sidecar.cache import NodeCache
from sidecar.layout import ModelDir
from sidecar.modelsource import parse_model_arg
from tests.fixtures.fuse import is_mounted, probe
from tests.fixtures.modelgen import generate_model
from tests.fixtures.servers import (
    Faults,
    fault_server,
    nginx_available,
    nginx_bytes_sent,
    nginx_server,
)

pytestmark = [pytest.mark.fuse, pytest.mark.nginx]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("link_root", ["cache", "none"])
def test_nginx_model_through_the_mount(
    fuse_available: None, sidecar_mount, tmp_path: Path, nginx_model, link_root: str
) -> None:
    mnt = tmp_path / "mnt"
    before = nginx_bytes_sent(nginx_model.server)
    m = sidecar_mount(
        tmp_path / "cache", mnt, [f"llama={nginx_model.url}"], "--link-root", link_root
    )
    m.wait_ready(["llama"])
    out = subprocess.run(
        ["sha256sum", *(str(mnt / "llama" / p) for p in nginx_model.info.files)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    got = {
        Path(line.split()[1]).relative_to(mnt / "llama").as_posix(): line.split()[0]
        for line in out.splitlines()
    }
    assert got == {p: f.sha256 for p, f in nginx_model.info.files.items()}
    # each byte crossed the network once, although sha256sum and the kernel read more
    sent = nginx_bytes_sent(nginx_model.server) - before
    assert sent == nginx_model.info.total_bytes


@pytest.fixture
def slow_model(tmp_path: Path):
    if not nginx_available():
        pytest.skip("nginx not installed (scripts/system-deps.sh installs nginx-light)")
    info = generate_model(tmp_path / "root" / "slow", total_bytes=6 << 20, shards=2, seed=3)
    with nginx_server(tmp_path / "root", limit_rate="3m") as server:
        yield f"{server}slow/", info


@pytest.mark.parametrize("link_root", ["cache", "none"])
def test_open_of_an_incomplete_file_waits_for_the_complete_bytes(
    fuse_available: None, sidecar_mount, tmp_path: Path, slow_model, link_root: str
) -> None:
    url, info = slow_model
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = f"slow={url}"
    mdir = ModelDir(cache, parse_model_arg(arg).source.cache_key)
    m = sidecar_mount(cache, mnt, [arg], "--link-root", link_root, "--parallel", "1")
    m.wait_ready(["slow"])
    rel = info.weight_files[0]
    result: list[str | BaseException] = []

    def reader() -> None:
        try:
            result.append(sha(mnt / "slow" / rel))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    # while the download runs: bytes land in .partial/, never under data/, and the mount
    # shows the listed size (a partial length would be a lie)
    deadline = time.monotonic() + 60
    seen_partial = False
    while thread.is_alive() and time.monotonic() < deadline:
        if mdir.partial_file(rel).exists():
            seen_partial = True
            assert not mdir.data_file(rel).exists()
            if link_root == "none":
                assert os.stat(mnt / "slow" / rel).st_size == info.files[rel].size
        time.sleep(0.02)
    thread.join(60)
    assert seen_partial, "the download finished before it could be observed"
    assert result == [info.files[rel].sha256]
    assert sha(mdir.data_file(rel)) == info.files[rel].sha256


def test_source_refusing_the_pod_stops_the_mount(
    fuse_available: None, sidecar_mount, tmp_path: Path, generated_model
) -> None:
    with fault_server(generated_model.root, Faults(deny=True)) as server:
        mnt = tmp_path / "mnt"
        m = sidecar_mount(tmp_path / "cache", mnt, [f"m={server}"])
        assert m.wait() != 0
        assert "access denied" in m.log
        assert not is_mounted(mnt)


def test_fetch_refused_after_start_is_an_error_for_the_app(
    fuse_available: None, sidecar_mount, tmp_path: Path, generated_model
) -> None:
    with fault_server(generated_model.root) as server:
        mnt = tmp_path / "mnt"
        m = sidecar_mount(tmp_path / "cache", mnt, [f"m={server}"], "--link-root", "none")
        m.wait_ready(["m"])
        server.faults.deny = True  # credentials revoked while the pod runs
        with pytest.raises(OSError) as err:
            (mnt / "m" / "config.json").read_bytes()
        assert err.value.errno == errno.EACCES
        assert probe(mnt, ["m"]).returncode == 0  # the mount itself keeps serving


def test_sigterm_during_a_fetch_unmounts_and_fails_the_waiting_open(
    fuse_available: None, sidecar_mount, tmp_path: Path
) -> None:
    if not nginx_available():
        pytest.skip("nginx not installed (scripts/system-deps.sh installs nginx-light)")
    info = generate_model(tmp_path / "root" / "slow", total_bytes=4 << 20, shards=1, seed=4)
    with nginx_server(tmp_path / "root", limit_rate="256k") as server:
        cache, mnt = tmp_path / "cache", tmp_path / "mnt"
        arg = f"slow={server}slow/"
        mdir = ModelDir(cache, parse_model_arg(arg).source.cache_key)
        m = sidecar_mount(cache, mnt, [arg], "--link-root", "cache", "--parallel", "1")
        m.wait_ready(["slow"])
        rel = info.weight_files[0]
        result: list[object] = []
        thread = threading.Thread(
            target=lambda: result.append(_try_read(mnt / "slow" / rel)), daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 30
        while not mdir.partial_file(rel).exists():
            assert time.monotonic() < deadline, m.log
            time.sleep(0.02)
        t0 = time.monotonic()
        assert m.stop(timeout=30) == 0, m.log
        assert time.monotonic() - t0 < 20  # did not wait for the 16 s download
        thread.join(30)
        assert len(result) == 1 and isinstance(result[0], OSError), result
        assert not is_mounted(mnt)
        assert not mdir.data_file(rel).exists()  # the half download stays partial


def _try_read(path: Path) -> object:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


def test_async_warmup_serves_at_once_and_fetches_opened_files_first(
    fuse_available: None, sidecar_mount, tmp_path: Path
) -> None:
    """``--warmup`` (async mode): the mount serves while the background fill runs, and a
    file the app opens is fetched next to it, not after it; no byte is fetched twice."""
    if not nginx_available():
        pytest.skip("nginx not installed (scripts/system-deps.sh installs nginx-light)")
    # ~12 s of background fill at 512 KiB/s; the opened shard alone takes ~3 s
    info = generate_model(tmp_path / "root" / "m", total_bytes=6 << 20, shards=4, seed=5)
    with nginx_server(tmp_path / "root", limit_rate="512k") as server:
        cache, mnt = tmp_path / "cache", tmp_path / "mnt"
        arg = f"m={server}m/"
        model = parse_model_arg(arg)
        m = sidecar_mount(cache, mnt, [arg], "--link-root", "cache", "--warmup", "--parallel", "1")
        # readiness polled in-process (a probe subprocess per poll is slow on a busy machine,
        # and the background fill is already running while we wait)
        deadline = time.monotonic() + 60
        while not (is_mounted(mnt) and os.path.isdir(mnt / "m")):
            assert m.proc.poll() is None and time.monotonic() < deadline, m.log
            time.sleep(0.01)
        last = info.weight_files[-1]  # the warm-up plan reaches it last
        assert sha(mnt / "m" / last) == info.files[last].sha256
        # read on demand while the ~6 s background fill is still on an earlier shard
        assert not NodeCache(cache).is_complete(model)
        deadline = time.monotonic() + 90
        while not NodeCache(cache).is_complete(model):
            assert time.monotonic() < deadline, m.log
            time.sleep(0.05)
        assert m.stop() == 0, m.log
        assert "background warm-up complete" in m.log
        assert nginx_bytes_sent(server) == info.total_bytes
