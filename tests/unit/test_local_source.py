"""Local sources (``file://``, ``pvc://``): roots, private directories and what is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.modelsource import parse_model_arg
from sidecar.sources import SourceAccessError, SourceError, open_source
from sidecar.sources.local import is_inside


@pytest.mark.parametrize(
    ("path", "root", "inside"),
    [
        ("/a/b", "/a", True),
        ("/a", "/a", True),
        ("/ab", "/a", False),
        ("/a/../b", "/a", True),  # lexical only: callers pass resolved paths
        ("/x", "/", True),
    ],
)
def test_is_inside(path: str, root: str, inside: bool) -> None:
    assert is_inside(path, os.path.realpath(root) if root == "/" else root) is inside


async def _read_all(src: object, path: str, size: int) -> bytes:
    return b"".join([c async for c in src.read_range(path, 0, size)])  # type: ignore[attr-defined]


async def test_a_file_swapped_for_a_symlink_after_listing_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "cache" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"S" * 64)
    src_dir = tmp_path / "models" / "m"
    src_dir.mkdir(parents=True)
    (src_dir / "w.bin").write_bytes(b"w" * 64)
    src = open_source(
        parse_model_arg(f"m=file://{src_dir}"),
        file_roots=[tmp_path / "models"],
        private_dirs=[tmp_path / "cache"],
    )
    [f] = await src.list_files()
    assert await _read_all(src, f.path, f.size) == b"w" * 64
    os.link(src_dir / "w.bin", tmp_path / "keep")  # the listed inode stays taken
    (src_dir / "w.bin").unlink()
    (src_dir / "w.bin").symlink_to(secret)
    with pytest.raises(SourceAccessError, match="outside the source"):
        await _read_all(src, f.path, f.size)
    # replaced by another file inside the source: not what was listed either
    (src_dir / "w.bin").unlink()
    (src_dir / "w.bin").write_bytes(b"x" * 64)
    with pytest.raises(SourceError, match="replaced since it was listed"):
        await _read_all(src, f.path, f.size)


async def test_unlisted_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    src = open_source(parse_model_arg(f"m=file://{tmp_path / 'm'}"), file_roots=[tmp_path])
    await src.list_files()
    with pytest.raises(SourceError, match="was not listed"):
        await _read_all(src, "other.bin", 1)


async def test_pvc_subpath_through_a_symlink_out_of_the_claim_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(b"x")
    claim = tmp_path / "pvcs" / "weights"
    claim.mkdir(parents=True)
    (claim / "models").symlink_to(elsewhere)
    src = open_source(parse_model_arg("m=pvc://weights/models"), pvc_root=tmp_path / "pvcs")
    with pytest.raises(SourceAccessError, match=r"outside the allowed claim mount"):
        await src.list_files()
