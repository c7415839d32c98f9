"""The Dragonfly backend end to end: the node cache's fetch engine (``NodeCache.ensure_file``)
reads every byte through a dfdaemon stand-in on a unix socket (the real gRPC service of the
``dragonfly-api`` package), which fetches back-to-source from nginx or the hub stand-in on
loopback; a daemon that fails mid-stream, stalls, is missing or serves corrupt pieces costs
nothing but the fallback to the origin (or the engine's sha256 check)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from sidecar.cache import NodeCache
from sidecar.modelsource import parse_model_arg
from sidecar.sources import Source, open_source
from sidecar.sources.dragonfly import DaemonClient, DragonflySource, wrap
from sidecar.sources.local import LocalSource
from tests.fixtures.dragonfly import dragonfly_daemon
from tests.fixtures.modelgen import sha256_file
from tests.fixtures.servers import ServedModel, nginx_bytes_sent

PART = 1 << 20  # small parts: several ranged reads per file, each its own daemon task


async def _fill(cache: NodeCache, src: Source, arg: str) -> dict[str, bytes]:
    model = parse_model_arg(arg)
    out = {}
    for f in await src.list_files():
        path = await cache.ensure_file(model, src, f, parallel=4)
        out[f.path] = path.read_bytes()
    return out


def _expected(served: ServedModel) -> dict[str, str]:
    return {p: g.sha256 for p, g in served.info.files.items()}


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}


async def test_every_byte_comes_through_the_daemon(tmp_path: Path, nginx_model: ServedModel):
    meter: Counter[str] = Counter()
    cache = NodeCache(tmp_path / "cache", part_size=PART)
    with dragonfly_daemon(piece=256 << 10) as daemon:
        model = parse_model_arg(f"m={nginx_model.url}")
        src = DragonflySource(
            open_source(model),
            DaemonClient(daemon.socket),
            meter=lambda via, n: meter.update({via: n}),
        )
        try:
            before = nginx_bytes_sent(nginx_model.server, path_contains="tiny-llama")
            files = await _fill(cache, src, f"m={nginx_model.url}")
        finally:
            await src.aclose()
            await src.daemon.aclose()
    total = nginx_model.info.total_bytes
    assert _digests(files) == _expected(nginx_model)
    assert meter == {"dragonfly": total}
    assert daemon.stats.bytes_sent >= total
    # the daemon went back to the source: the origin sent the model once, to the daemon
    sent = nginx_bytes_sent(nginx_model.server, path_contains="tiny-llama") - before
    assert sent == total
    assert all(u.startswith(nginx_model.url) for u in daemon.stats.urls)
    assert set(daemon.stats.applications) == {"modelcache"}
    # one daemon task per ranged read: the engine's parts, so pieces arrived out of order
    assert daemon.stats.tasks >= total // PART


async def test_hub_token_and_sha256_reach_the_daemon(tmp_path: Path, hf_model: ServedModel):
    cache = NodeCache(tmp_path / "cache", part_size=PART)
    model = parse_model_arg(f"m={hf_model.url}")
    with dragonfly_daemon() as daemon:
        src = DragonflySource(
            open_source(model, env=hf_model.server.env()), DaemonClient(daemon.socket)
        )
        try:
            files = await _fill(cache, src, f"m={hf_model.url}")
        finally:
            await src.aclose()
            await src.daemon.aclose()
    assert _digests(files) == _expected(hf_model)
    assert {h.get("Authorization") for h in daemon.stats.headers} == {"Bearer hf_test_token"}
    lfs = {g.sha256 for p, g in hf_model.info.files.items() if p.endswith(".safetensors")}
    assert {d.removeprefix("sha256:") for d in daemon.stats.digests if d} == lfs
    assert all("/resolve/" in u for u in daemon.stats.urls)


async def test_daemon_failing_mid_stream_falls_back_to_origin(
    tmp_path: Path, nginx_model: ServedModel
):
    meter: Counter[str] = Counter()
    cache = NodeCache(tmp_path / "cache", part_size=PART)
    with dragonfly_daemon(piece=128 << 10) as daemon:
        daemon.faults.abort_after_pieces = 3
        client = DaemonClient(daemon.socket, cooldown=3600)
        src = DragonflySource(
            open_source(parse_model_arg(f"m={nginx_model.url}")),
            client,
            meter=lambda via, n: meter.update({via: n}),
        )
        try:
            files = await _fill(cache, src, f"m={nginx_model.url}")
        finally:
            await src.aclose()
            await src.daemon.aclose()
    assert _digests(files) == _expected(nginx_model)
    assert meter["dragonfly"] + meter["origin"] == nginx_model.info.total_bytes
    assert meter["origin"] > 0
    # the first failure set the daemon aside: the reads after it (all but the ones already
    # in flight, 4 at a time) went straight to the origin
    assert not client.available()
    reads = sum(-(-g.size // PART) for g in nginx_model.info.files.values())
    assert daemon.stats.tasks < reads - 1


@pytest.mark.timeout(60)
async def test_stalled_daemon_falls_back_after_read_timeout(
    tmp_path: Path, nginx_model: ServedModel
):
    meter: Counter[str] = Counter()
    cache = NodeCache(tmp_path / "cache", part_size=PART)
    with dragonfly_daemon() as daemon:
        daemon.faults.stall = True
        src = DragonflySource(
            open_source(parse_model_arg(f"m={nginx_model.url}")),
            DaemonClient(daemon.socket),
            meter=lambda via, n: meter.update({via: n}),
            read_timeout=0.5,
        )
        try:
            files = await _fill(cache, src, f"m={nginx_model.url}")
        finally:
            await src.aclose()
            await src.daemon.aclose()
    assert _digests(files) == _expected(nginx_model)
    assert meter == {"origin": nginx_model.info.total_bytes}


async def test_missing_socket_falls_back_to_origin(tmp_path: Path, nginx_model: ServedModel):
    meter: Counter[str] = Counter()
    cache = NodeCache(tmp_path / "cache", part_size=PART)
    src = DragonflySource(
        open_source(parse_model_arg(f"m={nginx_model.url}")),
        DaemonClient(tmp_path / "no-daemon.sock"),
        meter=lambda via, n: meter.update({via: n}),
        read_timeout=5,
    )
    try:
        files = await _fill(cache, src, f"m={nginx_model.url}")
    finally:
        await src.aclose()
        await src.daemon.aclose()
    assert _digests(files) == _expected(nginx_model)
    assert meter == {"origin": nginx_model.info.total_bytes}


async def test_corrupt_pieces_are_caught_by_the_sha256_check(tmp_path: Path, hf_model: ServedModel):
    """The daemon is not trusted: a file whose listing has a sha256 is verified, so corrupt
    pieces never reach ``data/``; the engine fetches the file again, from the origin."""
    cache = NodeCache(tmp_path / "cache", part_size=PART, retries=0)
    model = parse_model_arg(f"m={hf_model.url}")
    with dragonfly_daemon() as daemon:
        daemon.faults.corrupt = True
        src = DragonflySource(
            open_source(model, env=hf_model.server.env()), DaemonClient(daemon.socket)
        )
        try:
            files = await src.list_files()
            weights = next(f for f in files if f.sha256)
            path = await cache.ensure_file(model, src, weights)
        finally:
            await src.aclose()
            await src.daemon.aclose()
    assert sha256_file(path) == weights.sha256
    assert src.reject_file(weights.path) is False  # already read from the origin


class _Settings:
    def __init__(self, socket: str | None) -> None:
        self.dragonfly_socket = socket


def test_wrap_only_when_a_socket_is_named_and_the_origin_has_urls(tmp_path: Path):
    http = open_source(parse_model_arg("m=http://127.0.0.1:9/model/"))
    assert wrap(http, "http://127.0.0.1:9/model/", _Settings(None)) is http
    wrapped = wrap(http, "http://127.0.0.1:9/model/", _Settings(str(tmp_path / "d.sock")))
    assert isinstance(wrapped, DragonflySource) and wrapped.origin is http
    assert wrapped.uses_credentials is False
    local = LocalSource(tmp_path, uri=f"file://{tmp_path}", allowed_roots=[tmp_path])
    assert wrap(local, f"file://{tmp_path}", _Settings(str(tmp_path / "d.sock"))) is local
