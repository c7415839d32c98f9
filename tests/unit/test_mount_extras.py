"""What the mount adds to a model's view: left-out markers, GGUF aliases, the hub commit."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from sidecar.cache import NodeCache
from sidecar.layout import ModelDir, file_id
from sidecar.modelsource import parse_model_arg
from sidecar.probe import LEFT_OUT_DIR, ProbeFailure, check_mount
from sidecar.sources import SourceAccessError, SourceError, SourceUnavailableError

try:
    import mfusepy

    from sidecar.fusefs import ModelFS, Namespace
    from sidecar.mount import (
        MountError,
        SourceListingError,
        _prepare_model,
        choose_commit,
        parse_gguf_aliases,
        pick_gguf,
        recorded_commit,
    )
except OSError as exc:  # the binding loads libfuse3 at import
    pytest.skip(f"libfuse3 not installed: {exc}", allow_module_level=True)


class NoProvider:
    def ensure_file(self, model: str, relpath: str) -> Path:
        raise AssertionError(f"{model}/{relpath} must not be fetched")


class Failing:
    uses_credentials = True

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def list_files(self) -> list[object]:
        raise self.exc

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(
    "exc",
    [
        SourceAccessError("HTTP 404 Not Found"),
        SourceAccessError("HTTP 401 Unauthorized"),
        SourceUnavailableError("connection refused"),
        SourceError("malformed model info"),
    ],
)
def test_every_listing_failure_is_one_error_class(tmp_path: Path, exc: Exception) -> None:
    cache = NodeCache(tmp_path, retries=0, backoff=0.001)
    model = parse_model_arg("m=hf://acme/x")
    with pytest.raises(SourceListingError, match=r"model m \(hf://acme/x@main\)"):
        asyncio.run(_prepare_model(cache, model, Failing(exc), []))  # type: ignore[arg-type]


def test_left_out_note_is_a_read_only_file_with_the_reason() -> None:
    ns = Namespace({"base": [("a.bin", 3)]}, notes={f"{LEFT_OUT_DIR}/lora": b"denied\n"})
    assert ns.dirs["/"] == [LEFT_OUT_DIR, "base"]
    assert ns.dirs[f"/{LEFT_OUT_DIR}"] == ["lora"]
    fs = ModelFS(ns, NoProvider(), lambda e: f"/links/{e.relpath}")
    attrs = fs.getattr(f"/{LEFT_OUT_DIR}/lora")
    assert stat.S_ISREG(attrs["st_mode"]) and attrs["st_size"] == 7
    fi = SimpleNamespace(flags=os.O_RDONLY, fh=0, keep_cache=0)
    fs.open(f"/{LEFT_OUT_DIR}/lora", fi)
    assert os.pread(fi.fh, 100, 0) == b"denied\n"
    fs.release(f"/{LEFT_OUT_DIR}/lora", fi)
    with pytest.raises(mfusepy.FuseOSError) as err:
        fs.open(f"/{LEFT_OUT_DIR}/lora", SimpleNamespace(flags=os.O_WRONLY, fh=0, keep_cache=0))
    assert err.value.errno == errno.EROFS
    with pytest.raises(ValueError, match="hidden top directory"):
        Namespace({}, notes={"visible/x": b""})


def test_gguf_alias_is_a_relative_link_that_never_fetches() -> None:
    ns = Namespace(
        {"m": [("Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", 5), ("README.md", 1)]},
        aliases={"m": {"Q4_K_M.gguf": "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"}},
    )
    assert ns.dirs["/m"] == ["Q4_K_M", "Q4_K_M.gguf", "README.md"]
    for link in (None, lambda e: f"/links/{e.relpath}"):
        fs = ModelFS(ns, NoProvider(), link)
        assert stat.S_ISLNK(fs.getattr("/m/Q4_K_M.gguf")["st_mode"])
        assert fs.readlink("/m/Q4_K_M.gguf") == "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"
    with pytest.raises(ValueError, match="not a file of it"):
        Namespace({"m": [("a.gguf", 1)]}, aliases={"m": {"Q8_0.gguf": "b.gguf"}})
    with pytest.raises(ValueError, match="has that path already"):
        Namespace({"m": [("a.gguf", 1)]}, aliases={"m": {"a.gguf": "a.gguf"}})


@pytest.mark.parametrize(
    ("paths", "quant", "want"),
    [
        (["m-Q4_K_M.gguf", "m-Q8_0.gguf"], "q4_k_m", "m-Q4_K_M.gguf"),
        (["m-Q4_K_M.gguf", "m-Q4_K.gguf"], "Q4_K", "m-Q4_K.gguf"),
        # no exact tag: a file whose name contains it, the shortest path, then by name
        (["m-Q4_K_S.gguf", "m-Q4_K_M.gguf"], "Q4_K", "m-Q4_K_M.gguf"),
        (
            [
                "Q8_0/m-Q8_0-00002-of-00002.gguf",
                "Q8_0/m-Q8_0-00001-of-00002.gguf",
                "m-Q4_0.gguf",
            ],
            "Q8_0",
            "Q8_0/m-Q8_0-00001-of-00002.gguf",
        ),
        (["m-Q4_K_M.bin", "README.md"], "Q4_K_M", None),
        (["mmproj-m-F16.gguf", "m-BF16.gguf", "m-F16.gguf"], "f16", "m-F16.gguf"),
        (["mmproj-m-F16.gguf"], "F16", None),
    ],
)
def test_pick_gguf(paths: list[str], quant: str, want: str | None) -> None:
    assert pick_gguf(paths, quant) == want


def test_parse_gguf_aliases() -> None:
    assert parse_gguf_aliases(["base:Q4_K_M"], ["base"]) == {"base": "Q4_K_M"}
    for bad, match in [
        ("base", "expected NAME:QUANT"),
        ("base:", "expected NAME:QUANT"),
        ("base:../x", "expected NAME:QUANT"),
        ("other:Q8_0", "no --model named"),
    ]:
        with pytest.raises(MountError, match=match):
            parse_gguf_aliases([bad], ["base"])
    with pytest.raises(MountError, match="alias already"):
        parse_gguf_aliases(["base:Q8_0", "base:Q4_0"], ["base"])


def test_recorded_commit_needs_every_recorded_version_to_agree(tmp_path: Path) -> None:
    mdir = ModelDir(tmp_path, "key")
    mdir.locks_dir.mkdir(parents=True)
    assert recorded_commit(mdir, ["a", "b"]) is None
    for path, version in (("a", "c1"), ("b", "c1")):
        (mdir.locks_dir / f"{file_id(path)}.meta").write_text(json.dumps({"version": version}))
    assert recorded_commit(mdir, ["a", "b", "unrecorded"]) == "c1"
    (mdir.locks_dir / f"{file_id('b')}.meta").write_text(json.dumps({"version": "c2"}))
    assert recorded_commit(mdir, ["a", "b"]) is None


def test_probe_accepts_a_model_left_out_on_purpose(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mnt = tmp_path / "mnt"
    (mnt / "base").mkdir(parents=True)
    mountinfo.write_text(f"50 22 0:50 / {mnt} rw - fuse.modelcache modelcache ro\n")
    with pytest.raises(ProbeFailure, match=r"model\(s\) lora not served"):
        check_mount(str(mnt), ["base", "lora"], str(mountinfo))
    (mnt / LEFT_OUT_DIR).mkdir()
    (mnt / LEFT_OUT_DIR / "lora").write_text("access denied\n")
    check_mount(str(mnt), ["base", "lora"], str(mountinfo))
    with pytest.raises(ProbeFailure, match=r"model\(s\) other not served"):
        check_mount(str(mnt), ["base", "lora", "other"], str(mountinfo))


C1, C2 = "1" * 40, "2" * 40


@pytest.mark.parametrize(
    ("case", "want"),
    [
        ((C2, None, False, None, "main"), C2),  # nothing cached yet: the hub's commit
        ((C2, C2, True, None, "main"), C2),
        ((C2, C1, True, None, "main"), C1),  # branch moved: the commit of the cached bytes
        ((C2, C1, False, None, "main"), C2),  # incomplete: fetched at the listing's commit
        ((None, C1, True, None, "main"), C1),  # hub unreachable: what the files were
        ((None, None, True, C1, "main"), C1),  # ... or what this pod laid out before
        ((None, None, True, None, C2), C2),  # ... or the revision, when it is a commit
        ((None, None, True, None, "main"), None),  # unknown: no layout
    ],
)
def test_choose_commit(
    case: tuple[str | None, str | None, bool, str | None, str], want: str | None
) -> None:
    listed, recorded, complete, known_ref, revision = case
    got = choose_commit(
        listed=listed, recorded=recorded, complete=complete, known_ref=known_ref, revision=revision
    )
    assert got == want
