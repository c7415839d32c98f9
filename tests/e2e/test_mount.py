"""``python -m sidecar mount`` end to end: a real FUSE mount through /dev/fuse.

Every mount runs as a subprocess (see tests/fixtures/fuse.py) and is checked with the tools
an app would use: ``sha256sum``, ``find -L``, ``safetensors.safe_open``, plain ``open``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from sidecar.cache import NodeCache
from sidecar.layout import ModelDir
from sidecar.modelsource import parse_model_arg
from tests.fixtures.fuse import REPO_ROOT, force_unmount, is_mounted, probe

pytestmark = pytest.mark.fuse


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_src(tmp_path: Path) -> Path:
    """A small model: config, tokenizer, two safetensors shards and a nested file."""
    src = tmp_path / "src" / "tiny-model"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"architectures": ["Tiny"]}))
    (src / "tokenizer.json").write_text(json.dumps({"vocab": list("abc")}))
    rng = np.random.default_rng(0)
    for i in (1, 2):
        tensors = {
            f"layer{i}.weight": rng.standard_normal((256, 512), dtype=np.float32),
            f"layer{i}.bias": rng.standard_normal((512,), dtype=np.float32),
        }
        save_file(tensors, str(src / f"model-0000{i}-of-00002.safetensors"))
    (src / "nested" / "deeper" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return src


#: The warm-up command; tests allow their own model directory with ``--file-root``.
WARMUP = [sys.executable, "-m", "sidecar", "warmup"]


def model_arg(src: Path, name: str = "tiny") -> str:
    return f"{name}=file://{src}"


def data_dir(cache: Path, arg: str) -> Path:
    return ModelDir(cache, parse_model_arg(arg).source.cache_key).data


def all_files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".partial" not in p.parts
    }


@pytest.mark.parametrize("link_root", ["cache", "none"])
def test_serves_every_file_with_the_right_bytes(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path, link_root: str
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = model_arg(model_src)
    m = sidecar_mount(cache, mnt, [arg], "--link-root", link_root)
    m.wait_ready(["tiny"])

    # find -L sees regular files at M/NAME/path in every mode
    found = subprocess.run(
        ["find", "-L", str(mnt / "tiny"), "-type", "f"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    expected = all_files(model_src)
    assert sorted(Path(p).relative_to(mnt / "tiny").as_posix() for p in found) == sorted(expected)

    out = subprocess.run(
        ["sha256sum", *found], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    got = {
        Path(line.split()[1]).relative_to(mnt / "tiny").as_posix(): line.split()[0]
        for line in out.splitlines()
    }
    assert got == expected

    entry = mnt / "tiny" / "config.json"
    if link_root == "none":
        assert entry.is_file() and not entry.is_symlink()
        assert entry.stat().st_size == (model_src / "config.json").stat().st_size
    else:
        assert entry.is_symlink()
        assert os.readlink(entry) == str(data_dir(cache, arg) / "config.json")
    # what was read is now complete in the node cache
    assert all_files(data_dir(cache, arg)) == expected


@pytest.mark.parametrize("link_root", ["cache", "none"])
def test_safetensors_reads_through_the_mount(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path, link_root: str
) -> None:
    mnt = tmp_path / "mnt"
    m = sidecar_mount(tmp_path / "cache", mnt, [model_arg(model_src)], "--link-root", link_root)
    m.wait_ready(["tiny"])
    name = "model-00002-of-00002.safetensors"
    with (
        safe_open(str(mnt / "tiny" / name), framework="np") as through,
        safe_open(str(model_src / name), framework="np") as direct,
    ):
        assert sorted(through.keys()) == ["layer2.bias", "layer2.weight"]
        for key in through.keys():  # noqa: SIM118 - safe_open has no __iter__
            np.testing.assert_array_equal(through.get_tensor(key), direct.get_tensor(key))


def test_app_link_root_points_into_the_app_view(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    """Default mode in a pod: links to <link-root>/<cache-key>/<path>, the app's view."""
    cache, mnt, app_view = tmp_path / "cache", tmp_path / "mnt", tmp_path / "app-models"
    arg = model_arg(model_src)
    key = parse_model_arg(arg).source.cache_key
    app_view.mkdir()
    # what the modelcache-cache volume with subPath models/<key>/data shows an app
    (app_view / key).symlink_to(data_dir(cache, arg))
    m = sidecar_mount(cache, mnt, [arg], "--link-root", str(app_view))
    m.wait_ready(["tiny"])
    link = mnt / "tiny" / "nested" / "deeper" / "blob.bin"
    assert os.readlink(link) == str(app_view / key / "nested/deeper/blob.bin")
    assert sha(link) == sha(model_src / "nested/deeper/blob.bin")


def test_files_are_fetched_on_open_only(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = model_arg(model_src)
    m = sidecar_mount(cache, mnt, [arg], "--link-root", "cache")
    m.wait_ready(["tiny"])
    data = data_dir(cache, arg)
    # listing and lstat never fetch
    assert sorted(os.listdir(mnt / "tiny")) == sorted(os.listdir(model_src))
    os.lstat(mnt / "tiny" / "tokenizer.json")
    assert not (data / "tokenizer.json").exists()
    # opening does, and blocks until the file is complete
    assert (mnt / "tiny" / "tokenizer.json").read_bytes() == (
        model_src / "tokenizer.json"
    ).read_bytes()
    assert (data / "tokenizer.json").exists()
    assert not (data / "config.json").exists()


@pytest.mark.parametrize("link_root", ["cache", "none"])
def test_partial_file_is_never_served_as_complete(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path, link_root: str
) -> None:
    """A download that died halfway (its .part file) is invisible; opening completes it."""
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = model_arg(model_src)
    rel = "nested/deeper/blob.bin"
    full = (model_src / rel).read_bytes()
    mdir = ModelDir(cache, parse_model_arg(arg).source.cache_key)
    mdir.partial_dir.mkdir(parents=True)
    mdir.partial_file(rel).write_bytes(full[: len(full) // 2])
    m = sidecar_mount(cache, mnt, [arg], "--link-root", link_root)
    m.wait_ready(["tiny"])
    path = mnt / "tiny" / rel
    if link_root == "none":
        assert path.stat().st_size == len(full)  # the listed size, not the partial one
    assert not mdir.data_file(rel).exists()
    assert path.read_bytes() == full
    assert mdir.data_file(rel).read_bytes() == full


@pytest.mark.parametrize("link_root", ["cache", "none"])
def test_mount_is_read_only(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path, link_root: str
) -> None:
    mnt = tmp_path / "mnt"
    m = sidecar_mount(tmp_path / "cache", mnt, [model_arg(model_src)], "--link-root", link_root)
    m.wait_ready(["tiny"])
    attempts = [
        lambda: (mnt / "tiny" / "new.txt").write_text("x"),
        (mnt / "tiny" / "sub").mkdir,
        (mnt / "tiny" / "config.json").unlink,
        lambda: (mnt / "tiny" / "config.json").rename(mnt / "tiny" / "c.json"),
    ]
    if link_root == "none":
        attempts.append(lambda: open(mnt / "tiny" / "config.json", "r+b").close())
    for attempt in attempts:
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS
    # writing through a symlink lands on the target, which the app sees read-only in a pod;
    # the mount itself never changes
    assert sorted(os.listdir(mnt / "tiny")) == sorted(os.listdir(model_src))


def test_two_models_and_probe_exit_codes(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert probe(mnt, ["tiny"]).returncode == 1  # nothing mounted yet
    m = sidecar_mount(
        tmp_path / "cache", mnt, [model_arg(model_src), model_arg(model_src / "nested", "lora")]
    )
    m.wait_ready(["tiny", "lora"])
    assert sorted(os.listdir(mnt)) == ["lora", "tiny"]
    assert probe(mnt, ["tiny", "lora"]).returncode == 0
    missing = probe(mnt, ["tiny", "draft"])
    assert missing.returncode == 1
    assert "draft" in missing.stderr and missing.stderr.count("\n") == 1


def test_sigterm_unmounts_cleanly(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    mnt = tmp_path / "mnt"
    # relative paths keep working after libfuse changes the daemon's directory to /
    rel_cache, rel_mnt = (os.path.relpath(p, REPO_ROOT) for p in (tmp_path / "cache", mnt))
    m = sidecar_mount(rel_cache, rel_mnt, [model_arg(model_src)], "--link-root", "none")
    m.wait_ready(["tiny"])
    assert (mnt / "tiny" / "config.json").read_bytes() == (model_src / "config.json").read_bytes()
    assert m.stop() == 0, m.log
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == []  # a plain empty directory again, no dead mount


def test_sigint_unmounts_cleanly(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    mnt = tmp_path / "mnt"
    m = sidecar_mount(tmp_path / "cache", mnt, [model_arg(model_src)])
    m.wait_ready(["tiny"])
    m.signal(signal.SIGINT)
    assert m.wait() == 0, m.log
    assert not is_mounted(mnt)


def test_restart_after_sigkill_recovers_the_dead_mount(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = model_arg(model_src)
    first = sidecar_mount(cache, mnt, [arg], "--link-root", "cache")
    first.wait_ready(["tiny"])
    first.signal(signal.SIGKILL)
    first.wait()
    assert is_mounted(mnt)
    with pytest.raises(OSError) as err:
        os.listdir(mnt)
    assert err.value.errno == errno.ENOTCONN  # the dead mount a crash leaves behind
    assert probe(mnt, ["tiny"]).returncode == 1

    second = sidecar_mount(cache, mnt, [arg], "--link-root", "cache")
    second.wait_ready(["tiny"])
    assert sha(mnt / "tiny" / "config.json") == sha(model_src / "config.json")
    assert second.stop() == 0
    assert not is_mounted(mnt)


def test_refuses_a_live_mount_and_unreadable_sources(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    first = sidecar_mount(cache, mnt, [model_arg(model_src)])
    first.wait_ready(["tiny"])
    second = sidecar_mount(cache, mnt, [model_arg(model_src)])
    assert second.wait() != 0
    assert "live FUSE mount is already there" in second.log
    assert probe(mnt, ["tiny"]).returncode == 0  # the first one is untouched

    other = tmp_path / "mnt2"
    denied = sidecar_mount(cache, other, [model_arg(tmp_path / "no-such-model")])
    assert denied.wait() != 0
    assert "access denied" in denied.log and "no-such-model" in denied.log
    assert not is_mounted(other)
    force_unmount(other)


def test_async_warmup_fills_the_cache_while_serving(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = model_arg(model_src)
    m = sidecar_mount(cache, mnt, [arg], "--link-root", "cache", "--warmup", "--parallel", "2")
    m.wait_ready(["tiny"])
    # a concurrent block-mode warm-up on the same node shares the fetches (single-flight)
    warm = subprocess.run(
        [*WARMUP, "--cache-dir", str(cache), "--model", arg, "--file-root", str(model_src)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert warm.returncode == 0, warm.stderr
    assert sha(mnt / "tiny" / "tokenizer.json") == sha(model_src / "tokenizer.json")
    model = parse_model_arg(arg)
    deadline = time.monotonic() + 60
    while not NodeCache(cache).is_complete(model):
        assert time.monotonic() < deadline, m.log
        time.sleep(0.05)
    assert all_files(data_dir(cache, arg)) == all_files(model_src)
    # the block warm-up may complete the model first; the background fill still has to
    # notice and finish on its own before the mount is stopped
    while "background warm-up complete" not in m.log:
        assert time.monotonic() < deadline, m.log
        time.sleep(0.05)
    assert m.stop() == 0


def test_include_limits_the_namespace(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    mnt = tmp_path / "mnt"
    m = sidecar_mount(
        tmp_path / "cache", mnt, [model_arg(model_src)], "--include", "*.json,nested/*/*.bin"
    )
    m.wait_ready(["tiny"])
    found = sorted(str(p.relative_to(mnt / "tiny")) for p in (mnt / "tiny").rglob("*"))
    assert found == [
        "config.json",
        "nested",
        "nested/deeper",
        "nested/deeper/blob.bin",
        "tokenizer.json",
    ]


def test_complete_model_is_served_from_its_manifest(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    """A complete model's namespace comes from manifest.json, yet the source is still
    listed: a pod whose credentials cannot read the source gets nothing from the cache."""
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = model_arg(model_src)
    subprocess.run(
        [*WARMUP, "--cache-dir", str(cache), "--model", arg, "--file-root", str(model_src)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    (model_src / "added-later.txt").write_text("not in the manifest")
    m = sidecar_mount(cache, mnt, [arg], "--link-root", "none")
    m.wait_ready(["tiny"])
    assert "added-later.txt" not in os.listdir(mnt / "tiny")
    assert sha(mnt / "tiny" / "config.json") == sha(model_src / "config.json")
    assert m.stop() == 0

    model_src.chmod(0)  # the source becomes unreadable for this pod
    try:
        if os.geteuid() == 0:
            # root reads anything: make the source vanish instead
            model_src.rename(model_src.with_name("gone"))
        denied = sidecar_mount(cache, tmp_path / "mnt2", [arg])
        assert denied.wait() != 0
        assert "access denied" in denied.log
    finally:
        if model_src.with_name("gone").exists():
            model_src.with_name("gone").rename(model_src)
        model_src.chmod(0o755)


def test_probe_wait_returns_once_the_mount_serves(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    """The classic sidecar's postStart: ``probe --wait`` blocks until the mount is ready."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "probe",
            "--mountpoint",
            str(mnt),
            "--model",
            "tiny",
            "--wait",
            "60",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert waiting.poll() is None  # nothing mounted yet: still waiting
        m = sidecar_mount(tmp_path / "cache", mnt, [model_arg(model_src)])
        assert waiting.wait(90) == 0, waiting.stderr.read() if waiting.stderr else ""
        assert probe(mnt, ["tiny"]).returncode == 0
        assert m.stop() == 0
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        if waiting.stderr:
            waiting.stderr.close()
    expired = probe(mnt, ["tiny"], wait=0.5)
    assert expired.returncode == 1 and "nothing is mounted" in expired.stderr


def test_sigterm_right_after_start_leaves_no_mount(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    mnt = tmp_path / "mnt"
    m = sidecar_mount(tmp_path / "cache", mnt, [model_arg(model_src)])
    deadline = time.monotonic() + 60
    while "model tiny:" not in m.log:  # signal handlers are installed after the listing
        assert m.proc.poll() is None and time.monotonic() < deadline, m.log
        time.sleep(0.01)
    rc = m.stop()
    assert rc in (0, -signal.SIGTERM), m.log
    assert not is_mounted(mnt)


def test_mount_holds_the_model_against_eviction_and_marks_it_used(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    arg = model_arg(model_src)
    mdir = ModelDir(cache, parse_model_arg(arg).source.cache_key)
    m = sidecar_mount(cache, mnt, [arg])
    m.wait_ready(["tiny"])
    assert mdir.last_used.exists()
    fd = os.open(mdir.model_lock, os.O_RDWR)
    try:
        # what the node agent tries before evicting: refused while the mount serves
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert m.stop() == 0
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at exit
    finally:
        os.close(fd)


def test_sigterm_exits_when_another_namespace_still_uses_the_mount(
    fuse_available: None, sidecar_mount, tmp_path: Path, model_src: Path
) -> None:
    """Like an app container whose copy of the mount is busy: our unmount cannot end the
    FUSE connection. The sidecar still exits 0, and the copy fails fast (no hang)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a second mount namespace")
    mnt = tmp_path / "mnt"
    m = sidecar_mount(tmp_path / "cache", mnt, [model_arg(model_src)], "--link-root", "none")
    m.wait_ready(["tiny"])
    # a private copy of the mount table, busy on the mount (cwd inside it)
    holder = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'cd "$1" && echo ready && read _ && cat config.json; echo "rc=$?"',
            "sh",
            str(mnt / "tiny"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        assert m.stop() == 0, m.log
        assert time.monotonic() - t0 < 30
        assert not is_mounted(mnt)
        assert "referenced elsewhere" in m.log
        out, _ = holder.communicate("go\n", timeout=30)
        assert "rc=1" in out  # the copy is dead (ENOTCONN), not hanging
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
