"""The Hugging Face cache layout the mount writes: the pure plan and the idempotent writer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sidecar.hubcache import (
    HubCacheError,
    RepoPlan,
    ensure_repo_dir,
    plan_repo,
    read_ref,
    repo_folder_name,
    write_repo,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = ["config.json", "model.safetensors", "tokenizer/vocab.json"]


def plan(revision: str = "main", files: list[str] = FILES) -> RepoPlan:
    return plan_repo("acme/tiny-llama", revision, COMMIT, files, "/models/tiny-llama/")


def test_repo_folder_name() -> None:
    assert repo_folder_name("acme/tiny-llama") == "models--acme--tiny-llama"
    assert repo_folder_name("gpt2") == "models--gpt2"
    for bad in ("a/b/c", "", "acme/../x", "acme/.hidden"):
        with pytest.raises(HubCacheError, match="expected org/name"):
            repo_folder_name(bad)


def test_plan_names_refs_snapshot_links_and_every_directory() -> None:
    p = plan()
    snap = f"models--acme--tiny-llama/snapshots/{COMMIT}"
    assert p.snapshot == snap
    assert p.ref == "models--acme--tiny-llama/refs/main"
    assert dict(p.links) == {
        f"{snap}/config.json": "/models/tiny-llama/config.json",
        f"{snap}/model.safetensors": "/models/tiny-llama/model.safetensors",
        f"{snap}/tokenizer/vocab.json": "/models/tiny-llama/tokenizer/vocab.json",
    }
    assert p.dirs == (
        "models--acme--tiny-llama",
        "models--acme--tiny-llama/blobs",
        "models--acme--tiny-llama/snapshots",
        snap,
        "models--acme--tiny-llama/refs",
        f"{snap}/tokenizer",
    )


def test_a_commit_revision_has_no_ref_and_nested_revisions_get_their_dirs() -> None:
    p = plan_repo("acme/x", COMMIT, COMMIT, ["a"], "/m/x")
    assert p.ref is None and "models--acme--x/refs" not in p.dirs
    p = plan_repo("acme/x", "refs/pr/1", COMMIT, ["a"], "/m/x")
    assert p.ref == "models--acme--x/refs/refs/pr/1"
    assert p.dirs[-2:] == ("models--acme--x/refs/refs", "models--acme--x/refs/refs/pr")


@pytest.mark.parametrize(
    ("revision", "commit", "files", "link_dir", "match"),
    [
        ("../x", COMMIT, ["a"], "/m", "revision"),
        ("a//b", COMMIT, ["a"], "/m", "revision"),
        ("main", "a/b", ["a"], "/m", "commit"),
        ("main", "..", ["a"], "/m", "commit"),
        ("main", COMMIT, ["../a"], "/m", "file"),
        ("main", COMMIT, ["a", "a/b"], "/m", "both a file and a directory"),
        ("main", COMMIT, ["a"], "relative/dir", "absolute"),
    ],
)
def test_plan_refuses_what_cannot_be_a_safe_path(
    revision: str, commit: str, files: list[str], link_dir: str, match: str
) -> None:
    with pytest.raises(HubCacheError, match=match):
        plan_repo("acme/x", revision, commit, files, link_dir)


def test_write_creates_the_layout_writable_by_every_uid(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the sidecar's umask must not narrow what the app may write
    try:
        done = write_repo(tmp_path, plan())
    finally:
        os.umask(old)
    repo = tmp_path / "models--acme--tiny-llama"
    assert (done.dirs, done.links, done.ref) == (6, 3, True)
    ref = repo / "refs" / "main"
    assert ref.read_bytes() == COMMIT.encode()  # the client reads it raw: no newline
    assert stat.S_IMODE(ref.stat().st_mode) == 0o666
    for d in ("", "refs", "blobs", "snapshots", f"snapshots/{COMMIT}/tokenizer"):
        assert stat.S_IMODE((repo / d).stat().st_mode) == 0o777, d
    assert list((repo / "blobs").iterdir()) == []
    link = repo / "snapshots" / COMMIT / "tokenizer" / "vocab.json"
    assert os.readlink(link) == "/models/tiny-llama/tokenizer/vocab.json"
    assert not [p for p in repo.rglob("*") if ".modelcache-tmp-" in p.name]


def test_write_is_idempotent_and_keeps_what_the_app_added(tmp_path: Path) -> None:
    write_repo(tmp_path, plan())
    repo = tmp_path / "models--acme--tiny-llama"
    # what the client adds next to ours: a file it downloaded itself, its misses, a tree
    (repo / "blobs" / "abc").write_bytes(b"adapter")
    (repo / "snapshots" / COMMIT / "extra.json").symlink_to("../../blobs/abc")
    (repo / ".no_exist" / COMMIT).mkdir(parents=True)
    ref_inode = (repo / "refs" / "main").stat().st_ino
    done = write_repo(tmp_path, plan())
    assert (done.dirs, done.links, done.ref, done.pruned) == (0, 0, False, 0)
    assert (repo / "refs" / "main").stat().st_ino == ref_inode  # not even rewritten
    assert (repo / "snapshots" / COMMIT / "extra.json").read_bytes() == b"adapter"
    assert (repo / ".no_exist" / COMMIT).is_dir()


def test_write_replaces_wrong_entries_atomically(tmp_path: Path) -> None:
    write_repo(tmp_path, plan())
    repo = tmp_path / "models--acme--tiny-llama"
    snap = repo / "snapshots" / COMMIT
    (snap / "config.json").unlink()
    (snap / "config.json").write_text("{}")  # a copy the client made (no symlinks)
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to("/elsewhere")
    (repo / "refs" / "main").write_text("f" * 40)  # the branch moved, by an older run
    ref_inode = (repo / "refs" / "main").stat().st_ino
    done = write_repo(tmp_path, plan())
    assert (done.links, done.ref) == (2, True)
    assert os.readlink(snap / "config.json") == "/models/tiny-llama/config.json"
    assert os.readlink(snap / "model.safetensors") == "/models/tiny-llama/model.safetensors"
    assert (repo / "refs" / "main").read_text() == COMMIT
    # replaced by rename, never truncated in place: a reader sees the old or the new ref
    assert (repo / "refs" / "main").stat().st_ino != ref_inode
    assert not [p for p in repo.rglob("*") if ".modelcache-tmp-" in p.name]


def test_write_refuses_a_directory_where_a_file_belongs(tmp_path: Path) -> None:
    (tmp_path / "models--acme--tiny-llama" / "snapshots" / COMMIT / "config.json").mkdir(
        parents=True
    )
    with pytest.raises(HubCacheError, match="a directory where a file belongs"):
        write_repo(tmp_path, plan())
    with pytest.raises(HubCacheError, match="not a directory"):
        write_repo(tmp_path / "missing", plan())


def test_read_ref(tmp_path: Path) -> None:
    assert read_ref(tmp_path, "acme/tiny-llama", "main") is None
    write_repo(tmp_path, plan())
    assert read_ref(tmp_path, "acme/tiny-llama", "main") == COMMIT
    assert read_ref(tmp_path, "acme/tiny-llama", "../main") is None


def test_a_model_without_layout_still_gets_a_writable_folder(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = ensure_repo_dir(tmp_path, "acme/left-out")
    finally:
        os.umask(old)
    assert path == tmp_path / "models--acme--left-out"
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 and list(path.iterdir()) == []
    assert ensure_repo_dir(tmp_path, "acme/left-out") == path  # idempotent


def test_a_moved_branch_takes_our_links_out_of_the_old_snapshot(tmp_path: Path) -> None:
    write_repo(tmp_path, plan())
    repo = tmp_path / "models--acme--tiny-llama"
    old = repo / "snapshots" / COMMIT
    (old / "adapter.json").symlink_to("../../blobs/abc")  # the client's own download
    new_commit = "f" * 40
    moved = plan_repo("acme/tiny-llama", "main", new_commit, FILES, "/models/tiny-llama")
    done = write_repo(tmp_path, moved)
    assert (done.links, done.ref, done.pruned) == (3, True, 3)
    assert (repo / "refs" / "main").read_text() == new_commit
    # the view now holds the new commit's files: the old snapshot must not show them
    assert sorted(p.name for p in old.rglob("*")) == ["adapter.json", "tokenizer"]
    assert os.readlink(repo / "snapshots" / new_commit / "config.json") == (
        "/models/tiny-llama/config.json"
    )
