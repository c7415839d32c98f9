"""Model sources against real servers on loopback: listing, ranged reads, access errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sidecar.modelsource import parse_model_arg
from sidecar.sources import (
    RemoteFile,
    Source,
    SourceAccessError,
    SourceError,
    open_source,
)
from sidecar.sources.s3 import S3Source
from tests.fixtures.modelgen import ModelInfo
from tests.fixtures.servers import ServedModel, fault_server


async def _read(src: Source, path: str, start: int, end: int) -> bytes:
    return b"".join([c async for c in src.read_range(path, start, end)])


def _sorted(files: list[RemoteFile]) -> list[RemoteFile]:
    return sorted(files, key=lambda f: f.path)


def _expected(info: ModelInfo) -> list[RemoteFile]:
    return _sorted([RemoteFile(f.path, f.size) for f in info.files.values()])


async def _check_listing_and_reads(src: Source, info: ModelInfo, *, with_sha: bool) -> None:
    try:
        files = await src.list_files()
        assert _sorted([RemoteFile(f.path, f.size) for f in files]) == _expected(info)
        shas = {f.path: f.sha256 for f in files}
        for path in info.weight_files:
            assert shas[path] == (info.files[path].sha256 if with_sha else None)
        shard = info.weight_files[-1]
        raw = (info.root / shard).read_bytes()
        assert await _read(src, shard, 0, len(raw)) == raw
        assert await _read(src, shard, 1000, 1000 + 70_000) == raw[1000:71_000]
        assert await _read(src, shard, len(raw) - 1, len(raw)) == raw[-1:]
    finally:
        await src.aclose()


# ---- file:// and pvc:// -----------------------------------------------------------------


async def test_file_source_lists_and_reads(generated_model: ModelInfo) -> None:
    src = open_source(
        parse_model_arg(f"m=file://{generated_model.root}"),
        file_roots=[generated_model.root.parent],
    )
    await _check_listing_and_reads(src, generated_model, with_sha=False)


async def test_pvc_source_resolves_under_pvc_root(tmp_path: Path) -> None:
    d = tmp_path / "pvcs" / "weights" / "models" / "m1"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "w.bin").write_bytes(b"x" * 10)
    (d / "config.json").write_bytes(b"{}")
    src = open_source(parse_model_arg("m=pvc://weights/models/m1"), pvc_root=tmp_path / "pvcs")
    files = await src.list_files()
    assert _sorted(files) == [RemoteFile("config.json", 2), RemoteFile("sub/w.bin", 10)]
    assert await _read(src, "sub/w.bin", 2, 5) == b"xxx"


async def test_pvc_source_missing_claim_is_an_access_error(tmp_path: Path) -> None:
    src = open_source(parse_model_arg("m=pvc://nothere/m"), pvc_root=tmp_path)
    with pytest.raises(SourceAccessError, match=r"claim 'nothere' mounted"):
        await src.list_files()


# ---- http(s):// with nginx and the fault server ----------------------------------------


async def test_http_source_against_nginx(nginx_model: ServedModel) -> None:
    src = open_source(parse_model_arg(f"m={nginx_model.url}"))
    await _check_listing_and_reads(src, nginx_model.info, with_sha=False)


async def test_http_listing_is_recursive(tmp_path: Path) -> None:
    (tmp_path / "m" / "a" / "b").mkdir(parents=True)
    (tmp_path / "m" / "a" / "b" / "deep.bin").write_bytes(b"1234")
    (tmp_path / "m" / "top.json").write_bytes(b"{}")
    with fault_server(tmp_path) as server:
        src = open_source(parse_model_arg(f"m={server}m/"))
        try:
            files = await src.list_files()
            assert _sorted(files) == [RemoteFile("a/b/deep.bin", 4), RemoteFile("top.json", 2)]
            assert await _read(src, "a/b/deep.bin", 1, 3) == b"23"
        finally:
            await src.aclose()


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/passwd", "..", "a/../../b", ".partial"])
async def test_http_listing_with_unsafe_names_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "ok.bin").write_bytes(b"ok")
    with fault_server(tmp_path) as server:
        server.faults.extra_entries = [{"name": name, "type": "file", "size": 3, "mtime": ""}]
        src = open_source(parse_model_arg(f"m={server}"))
        try:
            with pytest.raises(SourceError, match=r"unsafe|reserved"):
                await src.list_files()
        finally:
            await src.aclose()


async def test_http_403_is_an_access_error(tmp_path: Path) -> None:
    (tmp_path / "ok.bin").write_bytes(b"ok")
    with fault_server(tmp_path) as server:
        server.faults.deny = True
        src = open_source(parse_model_arg(f"m={server}"))
        try:
            with pytest.raises(SourceAccessError, match="403"):
                await src.list_files()
        finally:
            await src.aclose()


async def test_http_non_autoindex_listing_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_bytes(b"<html></html>")
    with fault_server(tmp_path) as server:
        src = open_source(parse_model_arg(f"m={server}index.html/"))
        try:
            with pytest.raises(SourceError, match="autoindex"):
                await src.list_files()
        finally:
            await src.aclose()


# ---- s3:// with moto --------------------------------------------------------------------


async def test_s3_source_lists_paginated_and_reads(
    s3_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3_model.server.env().items():
        monkeypatch.setenv(k, v)
    src = open_source(parse_model_arg(f"m={s3_model.url}"))
    await _check_listing_and_reads(src, s3_model.info, with_sha=False)
    paged = S3Source("models", "tiny-llama/", read_timeout=30, page_size=2)
    try:
        # 8 objects, 2 per page: four ListObjectsV2 calls chained by continuation tokens
        assert _sorted(await paged.list_files()) == _expected(s3_model.info)
    finally:
        await paged.aclose()


@pytest.mark.parametrize("what", ["secret", "key"])
async def test_s3_wrong_credentials_are_an_access_error(
    s3_model: ServedModel, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    for k, v in s3_model.server.env().items():
        monkeypatch.setenv(k, v)
    if what == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOBODY")
    src = open_source(parse_model_arg(f"m={s3_model.url}"))
    try:
        with pytest.raises(SourceAccessError, match="403"):
            await src.list_files()
    finally:
        await src.aclose()


async def test_s3_missing_bucket_is_an_access_error(
    s3_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3_model.server.env().items():
        monkeypatch.setenv(k, v)
    src = open_source(parse_model_arg("m=s3://no-such-bucket/x"))
    try:
        with pytest.raises(SourceAccessError, match="NoSuchBucket"):
            await src.list_files()
    finally:
        await src.aclose()


# ---- hf:// with the fake hub ------------------------------------------------------------


async def test_hf_source_lists_sha256_and_reads_through_redirect(
    hf_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in hf_model.server.env().items():
        monkeypatch.setenv(k, v)
    src = open_source(parse_model_arg(f"m={hf_model.url}"))
    await _check_listing_and_reads(src, hf_model.info, with_sha=True)
    raw = (hf_model.info.root / "config.json").read_bytes()
    src = open_source(parse_model_arg(f"m={hf_model.url}"))
    try:
        await src.list_files()
        assert hashlib.sha256(await _read(src, "config.json", 0, len(raw))).digest() == (
            hashlib.sha256(raw).digest()
        )
    finally:
        await src.aclose()


@pytest.mark.parametrize("token", [None, "hf_wrong"])
async def test_hf_without_the_right_token_is_an_access_error(
    hf_model: ServedModel, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hf_model.server.rstrip("/"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    src = open_source(parse_model_arg(f"m={hf_model.url}"))
    try:
        with pytest.raises(SourceAccessError, match="401"):
            await src.list_files()
    finally:
        await src.aclose()


async def test_hf_unknown_revision_is_an_access_error(
    hf_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in hf_model.server.env().items():
        monkeypatch.setenv(k, v)
    src = open_source(parse_model_arg(f"m={hf_model.url}@v9"))
    try:
        with pytest.raises(SourceAccessError, match="404"):
            await src.list_files()
    finally:
        await src.aclose()


@pytest.mark.parametrize(
    "case",
    [
        (401, "", None, "unauthorized", "no or invalid token; set HF_TOKEN"),
        (401, "", "t", "unauthorized", "rejects the token in HF_TOKEN"),
        (401, "RepoNotFound", None, "not-found", "or it is private and no HF_TOKEN is set"),
        (404, "RevisionNotFound", "t", "not-found", "revision 'v2' of org/m does not exist"),
        (401, "GatedRepo", None, "forbidden", "then set HF_TOKEN in the pod"),
        (403, "GatedRepo", "t", "forbidden", "request access at https://hub.example/org/m"),
    ],
)
def test_hub_refusals_are_classified_by_status_and_error_code(
    monkeypatch: pytest.MonkeyPatch, case: tuple[int, str, str | None, str, str]
) -> None:
    """The hub's X-Error-Code decides the kind where it is sent (it answers 401 RepoNotFound
    for a private repository without a token), never the message text."""
    from sidecar.sources.hf import HfSource

    status, code, token, kind, advice = case
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    src = HfSource("org/m", "v2", read_timeout=5)
    cls, text = src._advice(status, code, "")
    assert cls.kind == kind
    assert advice in text
