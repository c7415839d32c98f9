"""The loopback hub mirror answers the real ``huggingface_hub`` client (the app's baseline).

Without modelcache the stand-in server downloads a hub model with ``snapshot_download``
from the mirror: model info, the tree listing, then a ``HEAD`` and a ``GET`` per file at
the commit, which the client trusts only with ``X-Repo-Commit`` and an ``ETag``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.modelgen import generate_model, sha256_file
from tests.localpod.mirror import Mirror, publish_hub_repo

huggingface_hub = pytest.importorskip("huggingface_hub")

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="no nginx (nginx-light)"),
]


def test_snapshot_download_from_the_mirror_then_from_the_cache(tmp_path: Path) -> None:
    model = generate_model(tmp_path / "model", total_bytes=1 << 20, shards=2)
    store = tmp_path / "store"
    commit = publish_hub_repo(store, "org/tiny", model)
    cache = tmp_path / "hf-cache"
    with Mirror(store) as mirror:
        path = huggingface_hub.snapshot_download(
            "org/tiny", cache_dir=cache, endpoint=mirror.url.rstrip("/")
        )
        assert Path(path) == cache / "models--org--tiny" / "snapshots" / commit
        got = {p.relative_to(path).as_posix(): sha256_file(p) for p in Path(path).rglob("*")}
        assert got == {p: f.sha256 for p, f in model.files.items()}
        assert (cache / "models--org--tiny" / "refs" / "main").read_text() == commit
        sent = mirror.bytes_sent("/resolve/")
        assert sent == model.total_bytes  # every file once
        again = huggingface_hub.snapshot_download(
            "org/tiny", cache_dir=cache, endpoint=mirror.url.rstrip("/")
        )
        assert again == path
        assert mirror.bytes_sent("/resolve/") == sent  # the second call reads the cache
    # one blob per file: equal-sized shards must not share an ETag (the blob's name)
    blobs = {p.name for p in (cache / "models--org--tiny" / "blobs").iterdir()}
    assert len(blobs) == len(model.files)
