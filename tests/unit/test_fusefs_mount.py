"""The mount's start-up policy without FUSE: link roots, namespace source, access checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.cache import NodeCache
from sidecar.layout import ANONYMOUS_MARKER
from sidecar.modelsource import parse_model_arg
from sidecar.sources import RemoteFile, SourceAccessError, SourceUnavailableError

try:
    from sidecar.mount import MountError, _prepare_model, parse_link_root
except OSError as exc:  # sidecar.fusefs loads libfuse3 at import
    pytest.skip(f"libfuse3 not installed: {exc}", allow_module_level=True)

MODEL = parse_model_arg("m=http://example.invalid/models/m/")
FILES = [RemoteFile("config.json", 2), RemoteFile("w/model.safetensors", 4)]


class FakeSource:
    def __init__(self, listing: list[RemoteFile] | Exception, uses_credentials: bool) -> None:
        self.listing = listing
        self.uses_credentials = uses_credentials
        self.calls = 0

    async def list_files(self) -> list[RemoteFile]:
        self.calls += 1
        if isinstance(self.listing, Exception):
            raise self.listing
        return list(self.listing)

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        raise AssertionError("the namespace never reads data")
        yield b""  # pragma: no cover

    async def aclose(self) -> None:
        pass


@pytest.fixture
def cache(tmp_path: Path) -> NodeCache:
    return NodeCache(tmp_path / "cache", retries=1, backoff=0.001)


def complete(cache: NodeCache, files: list[RemoteFile]) -> None:
    md = cache.prepare_model(MODEL)
    for f in files:
        md.data_file(f.path).parent.mkdir(parents=True, exist_ok=True)
        md.data_file(f.path).write_bytes(b"x" * f.size)
    cache.write_manifest(MODEL, files)


def prepare(cache: NodeCache, src: FakeSource, include: list[str] | None = None) -> list[str]:
    files = asyncio.run(_prepare_model(cache, MODEL, src, include or []))  # type: ignore[arg-type]
    return sorted(files)


def test_link_roots(tmp_path: Path) -> None:
    assert parse_link_root("none", tmp_path) is None
    assert parse_link_root("cache", tmp_path) == tmp_path.resolve() / "models"
    assert parse_link_root("/var/run/modelcache/models", tmp_path) == Path(
        "/var/run/modelcache/models"
    )
    with pytest.raises(MountError, match="absolute path"):
        parse_link_root("relative/dir", tmp_path)


def test_incomplete_model_is_served_from_the_listing(cache: NodeCache) -> None:
    assert prepare(cache, FakeSource(FILES, True)) == ["config.json", "w/model.safetensors"]
    assert prepare(cache, FakeSource(FILES, True), ["*.json"]) == ["config.json"]


def test_complete_model_is_served_from_its_manifest_after_a_listing(cache: NodeCache) -> None:
    complete(cache, FILES[:1])
    src = FakeSource([*FILES, RemoteFile("new-upstream.bin", 1)], True)
    assert prepare(cache, src) == ["config.json"]
    assert src.calls == 1  # the access check ran even though the cache is complete


def test_access_denied_is_fatal_even_when_cached(cache: NodeCache) -> None:
    complete(cache, FILES)
    with pytest.raises(MountError, match="access denied"):
        prepare(cache, FakeSource(SourceAccessError("403 Forbidden"), False))


def test_unreachable_source_with_credentials_is_fatal(cache: NodeCache) -> None:
    complete(cache, FILES)
    src = FakeSource(SourceUnavailableError("connection refused"), True)
    with pytest.raises(MountError, match="source unavailable"):
        prepare(cache, src)
    assert src.calls == 2  # retried once (the cache's retry policy) first


def test_unreachable_public_source_serves_a_complete_cache(cache: NodeCache) -> None:
    complete(cache, FILES)
    src = FakeSource(SourceUnavailableError("connection refused"), False)
    # a copy some pod fetched with credentials is not served to a pod that sends none
    with pytest.raises(MountError, match="source unavailable"):
        prepare(cache, src)
    (cache.model_dir(MODEL).root / ANONYMOUS_MARKER).touch()
    assert prepare(cache, src) == ["config.json", "w/model.safetensors"]


def test_unreachable_source_and_incomplete_cache_is_fatal(cache: NodeCache) -> None:
    with pytest.raises(MountError, match="source unavailable"):
        prepare(cache, FakeSource(SourceUnavailableError("timeout"), False))
