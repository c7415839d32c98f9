"""ModelFS operations called directly (no mount): namespace, attributes, links, errors."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import mfusepy

    from sidecar.fusefs import FileEntry, ModelFS, Namespace
except OSError as exc:  # the binding loads libfuse3 at import
    pytest.skip(f"libfuse3 not installed: {exc}", allow_module_level=True)


class DirProvider:
    """Complete files live in one directory per model; records what was asked for."""

    def __init__(self, root: Path, fail: OSError | None = None) -> None:
        self.root = root
        self.fail = fail
        self.calls: list[tuple[str, str]] = []

    def ensure_file(self, model: str, relpath: str) -> Path:
        self.calls.append((model, relpath))
        if self.fail is not None:
            raise self.fail
        return self.root / model / relpath


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel, data in {"m/config.json": b"{}", "m/w/a.bin": os.urandom(5000)}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return tmp_path


def make_ns() -> Namespace:
    return Namespace({"m": [("config.json", 2), ("w/a.bin", 5000)], "lora": []})


def test_namespace_synthesizes_directories() -> None:
    ns = make_ns()
    assert ns.dirs["/"] == ["lora", "m"]
    assert ns.dirs["/m"] == ["config.json", "w"]
    assert ns.dirs["/m/w"] == ["a.bin"]
    assert ns.dirs["/lora"] == []
    assert ns.files["/m/w/a.bin"] == FileEntry("m", "w/a.bin", 5000)


@pytest.mark.parametrize(
    "models",
    [
        {"m": [("../x", 1)]},
        {"m": [("a//b", 1)]},
        {"m": [("a", 1), ("a/b", 1)]},
        {"m": [("a/b", 1), ("a", 1)]},
        {"a/b": [("x", 1)]},
        {"..": [("x", 1)]},
    ],
)
def test_namespace_refuses_bad_trees(models: dict[str, list[tuple[str, int]]]) -> None:
    with pytest.raises(ValueError):
        Namespace(models)


def test_regular_mode_attributes_and_listing(tree: Path) -> None:
    fs = ModelFS(make_ns(), DirProvider(tree), None)
    attrs = fs.getattr("/m/w/a.bin")
    assert stat.S_ISREG(attrs["st_mode"]) and attrs["st_mode"] & 0o777 == 0o444
    assert attrs["st_size"] == 5000
    assert stat.S_ISDIR(fs.getattr("/m/w")["st_mode"])
    assert fs.readdir("/m", None) == [".", "..", "config.json", "w"]
    with pytest.raises(mfusepy.FuseOSError) as err:
        fs.getattr("/m/missing")
    assert err.value.errno == errno.ENOENT
    with pytest.raises(mfusepy.FuseOSError) as err:
        fs.readdir("/m/config.json", None)
    assert err.value.errno == errno.ENOTDIR


def test_link_mode_readlink_fetches_first(tree: Path) -> None:
    provider = DirProvider(tree)
    fs = ModelFS(make_ns(), provider, lambda e: f"/links/key-{e.model}/{e.relpath}")
    attrs = fs.getattr("/m/w/a.bin")
    assert stat.S_ISLNK(attrs["st_mode"])
    assert attrs["st_size"] == len("/links/key-m/w/a.bin")
    assert provider.calls == []  # getattr never fetches: listing stays cheap
    assert fs.readlink("/m/w/a.bin") == "/links/key-m/w/a.bin"
    assert provider.calls == [("m", "w/a.bin")]


def test_readlink_reports_fetch_errors(tree: Path) -> None:
    fs = ModelFS(make_ns(), DirProvider(tree, OSError(errno.EACCES, "denied")), lambda e: "/x")
    with pytest.raises(OSError) as err:
        fs.readlink("/m/config.json")
    assert err.value.errno == errno.EACCES


def test_open_read_release_through_the_daemon(tree: Path) -> None:
    provider = DirProvider(tree)
    fs = ModelFS(make_ns(), provider, None)
    fi = SimpleNamespace(flags=os.O_RDONLY, fh=0, keep_cache=0)
    assert fs.open("/m/w/a.bin", fi) == 0
    assert fi.keep_cache == 1
    want = (tree / "m/w/a.bin").read_bytes()
    assert fs.read("/m/w/a.bin", 1000, 4500, fi) == want[4500:]
    fs.release("/m/w/a.bin", fi)
    with pytest.raises(OSError):
        os.fstat(fi.fh)  # closed


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_open_for_writing_is_refused(tree: Path, flags: int) -> None:
    provider = DirProvider(tree)
    fs = ModelFS(make_ns(), provider, None)
    with pytest.raises(mfusepy.FuseOSError) as err:
        fs.open("/m/config.json", SimpleNamespace(flags=flags, fh=0, keep_cache=0))
    assert err.value.errno == errno.EROFS
    assert provider.calls == []


def test_access_write_is_refused(tree: Path) -> None:
    fs = ModelFS(make_ns(), DirProvider(tree), None)
    assert fs.access("/m/config.json", os.R_OK) == 0
    with pytest.raises(mfusepy.FuseOSError) as err:
        fs.access("/m", os.W_OK)
    assert err.value.errno == errno.EROFS


def test_concurrent_readlinks_each_wait_for_the_provider(tree: Path) -> None:
    gate = threading.Event()

    class Slow(DirProvider):
        def ensure_file(self, model: str, relpath: str) -> Path:
            gate.wait(10)
            return super().ensure_file(model, relpath)

    fs = ModelFS(make_ns(), Slow(tree), lambda e: "/t/" + e.relpath)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(fs.readlink("/m/config.json")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    assert results == []  # nobody gets a target before the file is complete
    gate.set()
    for t in threads:
        t.join(10)
    assert results == ["/t/config.json"] * 4
