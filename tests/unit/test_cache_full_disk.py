"""A full node cache (ENOSPC on a real, small tmpfs) while a warm-up fetches several files at
once: the failing file's partial is removed, and so are the partials of the other files of
that warm-up (cancelled when the first one failed), which would only hold the disk full.
A partial that another fetch holds the lock of is left alone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cache import NodeCache
from sidecar.modelsource import parse_model_arg
from sidecar.warmup import WarmupError, warm_models
from tests.fixtures.servers import fault_server
from tests.fixtures.tmpfs import small_tmpfs

PART = 64 << 10


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a real full disk."""
    with small_tmpfs(tmp_path / "small", "3m") as mnt:
        yield mnt


def _parts(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob(".partial/*.part"))


async def test_full_disk_leaves_no_partial_of_any_file_behind(
    tmp_path: Path, small_fs: Path
) -> None:
    src = tmp_path / "src" / "m"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    for i in range(4):  # 4 x 900 KiB does not fit in 3 MiB
        (src / f"model-{i}.bin").write_bytes(os.urandom(900 << 10))
    with fault_server(src.parent) as server:
        server.faults.delay = 0.02  # every file is still downloading when one cannot fit
        server.faults.chunk = 32 << 10
        m = parse_model_arg(f"m={server}m/")
        cache = NodeCache(small_fs, part_size=PART, backoff=0.01)
        md = cache.model_dir(m)
        # a partial another process is fetching right now: not ours to remove
        md.partial_dir.mkdir(parents=True)
        md.locks_dir.mkdir(parents=True)
        busy = "other/file.bin"
        md.partial_file(busy).write_bytes(b"x" * 1000)
        fd = os.open(md.file_lock(busy), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with pytest.raises(WarmupError, match="no space left in the node cache"):
                await warm_models(cache, [m], parallel=8)
        finally:
            os.close(fd)
    assert _parts(small_fs) == [md.partial_file(busy).name]
    assert not list(md.partial_dir.glob("*.json"))
    free = shutil.disk_usage(small_fs).free
    assert free > (3 << 20) - (256 << 10), free  # the space is back
