"""The probe's mount-table parsing and its failure reasons (no FUSE needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.probe import ProbeFailure, canonical_path, check_mount, find_mount, read_mounts

REPO = Path(__file__).resolve().parents[2]

MOUNTINFO = (
    "22 1 0:21 / / rw,relatime - overlay overlay rw\n"
    "40 22 0:39 / /mnt/models rw,nosuid - fuse.modelcache modelcache ro,user_id=0\n"
    "41 22 0:40 / /mnt/with\\040space rw - fuse.modelcache modelcache ro\n"
    "42 22 0:41 / /mnt/plain rw shared:5 - tmpfs tmpfs rw\n"
    "43 22 0:42 / /mnt/plain rw - fuse.other other rw\n"
    "garbage line\n"
)


@pytest.fixture
def mountinfo(tmp_path: Path) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return str(path)


def test_read_mounts_parses_and_unescapes(mountinfo: str) -> None:
    mounts = read_mounts(mountinfo)
    assert [m.mountpoint for m in mounts] == [
        "/",
        "/mnt/models",
        "/mnt/with space",
        "/mnt/plain",
        "/mnt/plain",
    ]
    assert mounts[1].fstype == "fuse.modelcache"


def test_find_mount_takes_the_topmost(mountinfo: str) -> None:
    entry = find_mount("/mnt/plain", mountinfo)
    assert entry is not None and entry.fstype == "fuse.other"
    assert find_mount("/mnt/nothing", mountinfo) is None
    entry = find_mount("/mnt/with space/", mountinfo)
    assert entry is not None and entry.fstype == "fuse.modelcache"


def test_canonical_path_resolves_the_parent_only(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    assert canonical_path(str(tmp_path / "alias" / "mnt")) == str(real.resolve() / "mnt")


def test_not_mounted(tmp_path: Path) -> None:
    with pytest.raises(ProbeFailure, match="nothing is mounted"):
        check_mount(str(tmp_path), [])


def test_not_fuse(mountinfo: str, tmp_path: Path) -> None:
    text = MOUNTINFO + f"50 22 0:50 / {tmp_path} rw - tmpfs tmpfs rw\n"
    Path(mountinfo).write_text(text)
    with pytest.raises(ProbeFailure, match="tmpfs, not FUSE"):
        check_mount(str(tmp_path), [], mountinfo)


def test_missing_model_is_named(mountinfo: str, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    Path(mountinfo).write_text(MOUNTINFO + f"50 22 0:50 / {tmp_path} rw - fuse.x x rw\n")
    check_mount(str(tmp_path), ["m"], mountinfo)
    with pytest.raises(ProbeFailure, match=r"model\(s\) lora not served"):
        check_mount(str(tmp_path), ["m", "lora"], mountinfo)


def test_cli_exit_code_and_one_line_reason(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "probe", "--mountpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "nothing is mounted" in done.stderr


def test_probe_imports_stay_light() -> None:
    """The kubelet runs the probe every second or two: no aiohttp, no FUSE binding."""
    code = (
        "import sys, sidecar.__main__, sidecar.probe;"
        "heavy = {'aiohttp', 'mfusepy', 'pydantic', 'sidecar.cache', 'boto3'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "[]"
