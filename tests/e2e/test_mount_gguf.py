"""``mount --gguf-alias NAME:QUANT``: ``<QUANT>.gguf`` in the model's directory, over real FUSE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse]


@pytest.fixture
def gguf_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    files = {
        "README.md": b"# quants\n",
        "m-Q8_0.gguf": b"GGUF" + os.urandom(3000),
        "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf": b"GGUF" + os.urandom(2000),
        "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf": b"GGUF" + os.urandom(1000),
    }
    for rel, data in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    return repo


@pytest.mark.parametrize("link_root", ["cache", "none"])
def test_alias_names_the_first_shard_of_the_quant(
    fuse_available: None, sidecar_mount, tmp_path: Path, gguf_repo: Path, link_root: str
) -> None:
    mnt = tmp_path / "mnt"
    m = sidecar_mount(
        tmp_path / "cache",
        mnt,
        [f"m=file://{gguf_repo}"],
        "--link-root",
        link_root,
        "--gguf-alias",
        "m:q4_k_m",
    )
    m.wait_ready(["m"])
    alias = mnt / "m" / "q4_k_m.gguf"
    assert sorted(os.listdir(mnt / "m")) == ["Q4_K_M", "README.md", "m-Q8_0.gguf", "q4_k_m.gguf"]
    assert os.readlink(alias) == "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"
    first = (gguf_repo / "Q4_K_M" / "m-Q4_K_M-00001-of-00002.gguf").read_bytes()
    assert alias.read_bytes() == first  # followed through the mount, fetched on the way
    # the other shards sit beside the first one, in the mount
    second = (alias.parent / os.readlink(alias)).parent / "m-Q4_K_M-00002-of-00002.gguf"
    assert second.read_bytes() == (gguf_repo / "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf").read_bytes()


def test_alias_without_a_matching_file_stops_the_mount(
    fuse_available: None, sidecar_mount, tmp_path: Path, gguf_repo: Path
) -> None:
    m = sidecar_mount(
        tmp_path / "cache",
        tmp_path / "mnt",
        [f"m=file://{gguf_repo}"],
        "--gguf-alias",
        "m:IQ2_XXS",
    )
    assert m.wait(120) != 0
    assert "--gguf-alias m:IQ2_XXS: model m has no GGUF file of IQ2_XXS" in m.log
