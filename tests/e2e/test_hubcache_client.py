"""Hub-cache delivery against the real ``huggingface_hub`` client, over a real FUSE mount.

The node cache holds ``acme/tiny-llama`` (filled by the real warm-up from a hub stand-in);
the mount serves it and lays it out in the Hugging Face cache layout (``--hub-cache``), with
its links pointing at the real mountpoint as the app's view. The client then talks to a hub
that answers metadata only and refuses every file byte (403): returning the right files
there proves they came from the cache, and the hub's counters show no byte was asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.fuse import REPO_ROOT, probe
from tests.fixtures.modelgen import ModelInfo, generate_model, sha256_file
from tests.fixtures.nobody import open_to_others
from tests.fixtures.servers import ServerURL, fake_hf_hub, free_port

huggingface_hub = pytest.importorskip("huggingface_hub")

pytestmark = [pytest.mark.fuse]

TOKEN = "hf_test_token"
REPO = "acme/tiny-llama"
COMMIT = hashlib.sha1(REPO.encode()).hexdigest()  # the stand-in's commit of a repo


@dataclass
class Hubs:
    root: Path
    model: ModelInfo
    adapter: ModelInfo
    full: ServerURL  # serves everything
    meta: ServerURL  # serves metadata, refuses file bytes
    cache: Path  # the node cache, holding acme/tiny-llama complete


@pytest.fixture(scope="module")
def hubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hubs]:
    root = tmp_path_factory.mktemp("hub-repos")
    model = generate_model(root / "acme" / "tiny-llama", total_bytes=2 << 20, shards=2, seed=7)
    adapter = generate_model(root / "acme" / "adapter", total_bytes=64 << 10, shards=1, seed=8)
    cache = tmp_path_factory.mktemp("node-cache")
    with (
        fake_hf_hub(root, token=TOKEN) as full,
        fake_hf_hub(root, token=TOKEN, metadata_only=True) as meta,
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar",
                "warmup",
                "--cache-dir",
                str(cache),
                "--model",
                f"tiny=hf://{REPO}",
            ],
            env={**os.environ, **full.env()},
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        yield Hubs(root, model, adapter, full, meta, cache)


def start_mount(
    sidecar_mount,
    hubs: Hubs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models: list[str],
    *extra: str,
):
    for key, value in hubs.meta.env().items():
        monkeypatch.setenv(key, value)  # the mount process inherits them
    mnt, hub_cache = tmp_path / "mnt", tmp_path / "hub-cache"
    hub_cache.mkdir()
    m = sidecar_mount(
        hubs.cache,
        mnt,
        models,
        "--link-root",
        "cache",
        "--hub-cache",
        str(hub_cache),
        "--hub-link-root",
        str(mnt),
        *extra,
    )
    return m, mnt, hub_cache


def snapshot_shas(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file()  # follows the snapshot's links, through the mount, into the cache
    }


def test_client_returns_the_cached_model_and_fetches_no_byte(
    fuse_available: None, sidecar_mount, hubs: Hubs, tmp_path: Path, monkeypatch
) -> None:
    m, _mnt, hub_cache = start_mount(
        sidecar_mount, hubs, tmp_path, monkeypatch, [f"tiny=hf://{REPO}"]
    )
    m.wait_ready(["tiny"])
    repo_dir = hub_cache / "models--acme--tiny-llama"
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    want = {p: f.sha256 for p, f in hubs.model.files.items()}
    hubs.meta.stats.api_requests = hubs.meta.stats.head_requests = 0

    path = huggingface_hub.snapshot_download(
        REPO, cache_dir=hub_cache, endpoint=hubs.meta.rstrip("/"), token=TOKEN
    )
    assert Path(path) == repo_dir / "snapshots" / COMMIT
    assert snapshot_shas(Path(path)) == want
    one = huggingface_hub.hf_hub_download(
        REPO,
        hubs.model.weight_files[0],
        cache_dir=hub_cache,
        endpoint=hubs.meta.rstrip("/"),
        token=TOKEN,
    )
    assert sha256_file(Path(one)) == want[hubs.model.weight_files[0]]
    assert os.path.realpath(one).startswith(str(hubs.cache))  # read from the node cache

    stats = hubs.meta.stats
    assert stats.bytes_sent == 0 and stats.file_requests == 0  # no model byte from the hub
    assert stats.api_requests >= 1  # it did ask the hub (no offline switch)
    assert stats.head_requests == 1  # hf_hub_download of a branch checks the commit


def test_an_uncached_adapter_is_still_downloaded_into_the_same_cache(
    fuse_available: None, sidecar_mount, hubs: Hubs, tmp_path: Path, monkeypatch
) -> None:
    m, _, hub_cache = start_mount(sidecar_mount, hubs, tmp_path, monkeypatch, [f"tiny=hf://{REPO}"])
    m.wait_ready(["tiny"])
    before = hubs.full.stats.bytes_sent
    path = huggingface_hub.snapshot_download(
        "acme/adapter", cache_dir=hub_cache, endpoint=hubs.full.rstrip("/"), token=TOKEN
    )
    assert Path(path).parent.parent == hub_cache / "models--acme--adapter"
    assert snapshot_shas(Path(path)) == {p: f.sha256 for p, f in hubs.adapter.files.items()}
    assert hubs.full.stats.bytes_sent - before == hubs.adapter.total_bytes
    # and the cached model next to it is untouched: still served without a byte
    base = huggingface_hub.snapshot_download(
        REPO, cache_dir=hub_cache, endpoint=hubs.full.rstrip("/"), token=TOKEN
    )
    assert snapshot_shas(Path(base)) == {p: f.sha256 for p, f in hubs.model.files.items()}
    assert hubs.full.stats.bytes_sent - before == hubs.adapter.total_bytes


def test_with_the_hub_unreachable_the_cached_snapshot_is_returned(
    fuse_available: None, sidecar_mount, hubs: Hubs, tmp_path: Path, monkeypatch
) -> None:
    m, _, hub_cache = start_mount(sidecar_mount, hubs, tmp_path, monkeypatch, [f"tiny=hf://{REPO}"])
    m.wait_ready(["tiny"])
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    path = huggingface_hub.snapshot_download(REPO, cache_dir=hub_cache, endpoint=down)
    assert Path(path) == hub_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert snapshot_shas(Path(path)) == {p: f.sha256 for p, f in hubs.model.files.items()}
    one = huggingface_hub.hf_hub_download(REPO, "config.json", cache_dir=hub_cache, endpoint=down)
    assert Path(one).read_bytes() == (hubs.model.root / "config.json").read_bytes()


def test_restart_keeps_the_layout_and_what_the_app_added(
    fuse_available: None, sidecar_mount, hubs: Hubs, tmp_path: Path, monkeypatch
) -> None:
    m, mnt, hub_cache = start_mount(
        sidecar_mount, hubs, tmp_path, monkeypatch, [f"tiny=hf://{REPO}"]
    )
    m.wait_ready(["tiny"])
    repo_dir = hub_cache / "models--acme--tiny-llama"
    (repo_dir / ".no_exist" / COMMIT).mkdir(parents=True)  # what the client writes
    (repo_dir / ".no_exist" / COMMIT / "generation_config.json").touch()
    ref_inode = (repo_dir / "refs" / "main").stat().st_ino
    assert m.stop() == 0
    again = sidecar_mount(
        hubs.cache,
        mnt,
        [f"tiny=hf://{REPO}"],
        "--link-root",
        "cache",
        "--hub-cache",
        str(hub_cache),
        "--hub-link-root",
        str(mnt),
    )
    again.wait_ready(["tiny"])
    assert (repo_dir / "refs" / "main").stat().st_ino == ref_inode  # left alone
    assert (repo_dir / ".no_exist" / COMMIT / "generation_config.json").exists()
    assert "0 new" in again.log


def test_on_failure_continue_leaves_out_an_unlistable_model(
    fuse_available: None, sidecar_mount, hubs: Hubs, tmp_path: Path, monkeypatch
) -> None:
    models = [f"tiny=hf://{REPO}", "lora=hf://acme/no-such-adapter"]
    m, mnt, hub_cache = start_mount(
        sidecar_mount, hubs, tmp_path, monkeypatch, models, "--on-failure", "continue"
    )
    m.wait_ready(["tiny", "lora"])  # the probe's command line is the same as ever
    assert sorted(os.listdir(mnt)) == [".left-out", "tiny"]
    reason = (mnt / ".left-out" / "lora").read_text()
    assert "hf://acme/no-such-adapter" in reason and "404" in reason
    # the left-out model's folder is there, empty and writable: the app's own download
    # lands in it (the app mounts it; a folder the kubelet made would be root's)
    assert sorted(p.name for p in hub_cache.iterdir()) == [
        "models--acme--no-such-adapter",
        "models--acme--tiny-llama",
    ]
    left = hub_cache / "models--acme--no-such-adapter"
    assert list(left.iterdir()) == [] and stat.S_IMODE(left.stat().st_mode) == 0o777
    assert "model lora left out" in m.log
    assert probe(mnt, ["tiny", "other"]).returncode == 1  # a model never asked for still fails


def test_on_failure_fail_is_the_default(
    fuse_available: None, sidecar_mount, hubs: Hubs, tmp_path: Path, monkeypatch
) -> None:
    models = [f"tiny=hf://{REPO}", "lora=hf://acme/no-such-adapter"]
    m, _mnt, hub_cache = start_mount(sidecar_mount, hubs, tmp_path, monkeypatch, models)
    assert m.wait(120) != 0
    assert "model lora (hf://acme/no-such-adapter@main): access denied" in m.log
    assert list(hub_cache.iterdir()) == []  # nothing half-written for the other model


def test_async_mode_the_client_waits_for_the_sidecar_fetch(
    fuse_available: None, sidecar_mount, hubs: Hubs, tmp_path: Path, monkeypatch
) -> None:
    """Nothing cached yet (``warmup: async``): the client's lookups wait in the mount while
    the sidecar fetches each file once from the hub; the client itself fetches nothing."""
    for key, value in hubs.full.env().items():
        monkeypatch.setenv(key, value)
    mnt, hub_cache = tmp_path / "mnt", tmp_path / "hub-cache"
    hub_cache.mkdir()
    before = hubs.full.stats.bytes_sent
    m = sidecar_mount(
        tmp_path / "empty-cache",
        mnt,
        [f"tiny=hf://{REPO}"],
        "--link-root",
        "cache",
        "--hub-cache",
        str(hub_cache),
        "--hub-link-root",
        str(mnt),
    )
    m.wait_ready(["tiny"])
    path = huggingface_hub.snapshot_download(
        REPO, cache_dir=hub_cache, endpoint=hubs.meta.rstrip("/"), token=TOKEN
    )
    assert snapshot_shas(Path(path)) == {p: f.sha256 for p, f in hubs.model.files.items()}
    assert hubs.full.stats.bytes_sent - before == hubs.model.total_bytes  # by the sidecar
    assert hubs.meta.stats.bytes_sent == 0


_APP_SCRIPT = """
import json, os, sys
import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError
repo, cache, meta, full, token = sys.argv[1:6]
out = {}
# what the layout holds (like vLLM, which asks for the weight files by pattern)
path = huggingface_hub.snapshot_download(
    repo, cache_dir=cache, endpoint=meta, token=token,
    allow_patterns=["*.safetensors", "config.json", "model.safetensors.index.json"],
)
out["snapshot"] = path
p = huggingface_hub.hf_hub_download(repo, "tokenizer.json", cache_dir=cache, endpoint=full,
                                    token=token)
out["tokenizer"] = p
try:
    huggingface_hub.hf_hub_download(repo, "missing.json", cache_dir=cache, endpoint=full,
                                    token=token)
except EntryNotFoundError:
    out["missing"] = "EntryNotFoundError"
print(json.dumps(out))
"""


def test_an_app_running_as_another_uid_uses_and_extends_the_layout(
    fuse_available: None, sidecar_mount, hubs: Hubs, monkeypatch
) -> None:
    """The sidecar writes as root; the app (uid 65534 here) writes the client's own files
    into the same folder: its tree listing, a file left out by ``--include``, a miss."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run the client as another uid")
    # pytest's tmp_path is private to root: this test's tree must be readable by the app
    base = Path(tempfile.mkdtemp(prefix="modelcache-uid-"))
    base.chmod(0o755)
    mnt, hub_cache = base / "mnt", base / "hub"
    hub_cache.mkdir(mode=0o777)
    hub_cache.chmod(0o777)  # the app's own cache root (its .locks/ live there)
    for key, value in hubs.full.env().items():
        monkeypatch.setenv(key, value)
    m = sidecar_mount(
        base / "cache",
        mnt,
        [f"tiny=hf://{REPO}"],
        "--link-root",
        "cache",
        "--hub-cache",
        str(hub_cache),
        "--hub-link-root",
        str(mnt),
        "--include",
        "*.safetensors,config.json,model.safetensors.index.json",
    )
    try:
        m.wait_ready(["tiny"])
        sent = hubs.full.stats.bytes_sent
        with open_to_others(Path(__file__).resolve().parents[2], Path(sys.prefix)):
            done = subprocess.run(
                [
                    *("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"),
                    *(sys.executable, "-c", _APP_SCRIPT, REPO, str(hub_cache)),
                    *(hubs.meta.rstrip("/"), hubs.full.rstrip("/"), TOKEN),
                ],
                env={**os.environ, "HOME": str(base), "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        repo_dir = hub_cache / "models--acme--tiny-llama"
        snap = Path(out["snapshot"])
        assert snap == repo_dir / "snapshots" / COMMIT
        weights = hubs.model.weight_files
        assert {p.name for p in snap.iterdir()} >= {*weights, "config.json"}
        for w in weights:
            assert sha256_file(snap / w) == hubs.model.files[w].sha256
        # the client's own writes, as the app's uid, beside the sidecar's entries
        trees = repo_dir / "trees" / f"{COMMIT}.json"
        assert trees.stat().st_uid == 65534
        tokenizer = Path(out["tokenizer"])
        assert tokenizer == snap / "tokenizer.json" and tokenizer.is_symlink()
        assert tokenizer.read_bytes() == (hubs.model.root / "tokenizer.json").read_bytes()
        assert (repo_dir / "blobs").stat().st_uid == 0  # ours; the blob inside is the app's
        assert out["missing"] == "EntryNotFoundError"
        assert (repo_dir / ".no_exist" / COMMIT / "missing.json").exists()
        # the app downloaded only what the layout does not hold (the sidecar's fetches of
        # the included files went to the other counter: the node cache was empty)
        tokenizer_size = hubs.model.files["tokenizer.json"].size
        included = sum(
            f.size
            for p, f in hubs.model.files.items()
            if p.endswith(".safetensors") or p in ("config.json", "model.safetensors.index.json")
        )
        assert hubs.full.stats.bytes_sent - sent == tokenizer_size + included
    finally:
        m.stop()
        shutil.rmtree(base, ignore_errors=True)
