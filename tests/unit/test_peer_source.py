"""PeerSource decisions against an in-memory peer network: which node is asked for a piece,
how long it is given, what comes from the origin, what a failed verification excludes.

The network side (TLS, HTTP, the Kubernetes API) is tested for real in
tests/e2e/test_peers.py; here only the choices are."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from sidecar.modelsource import parse_model_uri
from sidecar.sources import RefetchableSource, RemoteFile, SourceUnavailableError
from sidecar.sources.peer import Peer, PeerSource, PeerTuning, PeerUnavailableError, rank_nodes
from sidecar.sources.route import FetchSettings, source_wrapper, wrap_source

KEY = "m-0123456789ab"
FILE = RemoteFile("model.safetensors", 1000, "ab" * 32)
TUNING = PeerTuning(stall=1, wait=7, grace=2, join_window=0, piece=100)


@dataclass
class Origin:
    data: bytes = bytes(range(256)) * 4
    reads: list[tuple[int, int]] = field(default_factory=list)
    fail_listing: bool = False
    uses_credentials: bool = False
    closed: bool = False

    async def list_files(self) -> list[RemoteFile]:
        if self.fail_listing:
            raise SourceUnavailableError("origin: unreachable")
        return [FILE]

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        self.reads.append((start, end))
        yield self.data[start:end]

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class Network:
    peers: list[Peer]
    has: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> range it holds
    dies_after: dict[str, int] = field(default_factory=dict)
    asked: list[tuple[str, int, float, float]] = field(default_factory=list)
    claims: list[tuple[int, int]] = field(default_factory=list)
    released: list[tuple[int, int]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    node: str = "me"

    async def holders(self, key: str, *, fresh: bool = False) -> list[Peer]:
        return self.peers

    async def announce(self, key: str) -> None:
        self.events.append("announce")

    async def finish(self, key: str) -> None:
        self.events.append("finish")

    async def read(
        self, peer: Peer, key: str, f: RemoteFile, start: int, end: int, **kw: Any
    ) -> AsyncIterator[bytes]:
        self.asked.append((peer.node, start, kw["wait"], kw["grace"]))
        lo, hi = self.has.get(peer.node, (0, 0))
        if not (lo <= start and end <= hi):
            raise PeerUnavailableError(f"{peer.node}: HTTP 409")
        cut = self.dies_after.get(peer.node)
        if cut is not None:
            yield Origin.data[start : start + cut]
            raise PeerUnavailableError(f"{peer.node}: connection lost")
        yield Origin.data[start:end]

    def claim(self, key: str, path: str, start: int, end: int) -> Callable[[], None]:
        self.claims.append((start, end))
        return lambda: self.released.append((start, end))

    async def manifest(self, peer: Peer, key: str) -> dict[str, Any] | None:
        return self.manifests.get(peer.node)


async def read_all(src: PeerSource, start: int, end: int) -> bytes:
    await src.list_files()
    return b"".join([c async for c in src.read_range(FILE.path, start, end)])


def fetching(*names: str) -> list[Peer]:
    return [Peer(n, f"https://{n}:1", fetching=True) for n in names]


async def test_complete_peers_first_and_nothing_from_the_origin() -> None:
    net = Network(
        [Peer("a", "https://a:1", complete=True), Peer("b", "https://b:1", complete=True)]
    )
    net.has = {"a": (0, 1000), "b": (0, 1000)}
    origin = Origin()
    src = PeerSource(origin, KEY, net, TUNING)
    assert await read_all(src, 0, 100) == origin.data[:100]
    assert origin.reads == [] and net.claims == []
    first = rank_nodes(["a", "b"], KEY, FILE.path, 0)[0]
    assert net.asked == [(first, 0, 0.0, 0.0)]
    assert src.counts.peers == {first: 100}


async def test_the_owner_gets_a_grace_the_ones_ranked_above_a_short_one_those_below_none() -> None:
    names = ["a", "b", "c", "d"]
    net = Network(fetching(*names))
    origin = Origin()
    src = PeerSource(origin, KEY, net, TUNING)
    assert await read_all(src, 300, 400) == origin.data[300:400]
    order = rank_nodes([*names, "me"], KEY, FILE.path, 3)
    mine = order.index("me")
    expected = []
    for i, n in enumerate(order):
        if n == "me":
            continue
        grace = TUNING.grace if i == 0 else TUNING.grace / 4 if i < mine else 0.0
        expected.append((n, 300, TUNING.wait, grace))
    assert net.asked == expected
    # nobody had it: this node claimed it, read it from the origin, and keeps the claim
    assert net.claims == [(300, 400)] and net.released == []
    assert origin.reads == [(300, 400)]


async def test_a_peer_that_dies_mid_range_leaves_the_rest_to_the_next() -> None:
    net = Network([Peer("a", "https://a:1", complete=True)])
    net.has = {"a": (0, 1000)}
    net.dies_after = {"a": 30}
    origin = Origin()
    src = PeerSource(origin, KEY, net, TUNING)
    assert await read_all(src, 0, 100) == origin.data[:100]
    assert origin.reads == [(30, 100)]
    assert src.counts.peers == {"a": 30} and src.counts.origin == 70


async def test_a_failed_origin_read_releases_its_claim() -> None:
    class Broken(Origin):
        async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
            raise SourceUnavailableError("origin: 503")
            yield b""

    net = Network(fetching("a"))
    src = PeerSource(Broken(), KEY, net, TUNING)
    with pytest.raises(SourceUnavailableError):
        await read_all(src, 0, 100)
    assert net.claims == net.released == [(0, 100)]


async def test_rejected_peers_are_never_asked_again() -> None:
    net = Network([Peer("a", "https://a:1", complete=True)])
    net.has = {"a": (0, 1000)}
    origin = Origin()
    src = PeerSource(origin, KEY, net, TUNING)
    assert isinstance(src, RefetchableSource)
    await read_all(src, 0, 100)
    assert src.reject_file(FILE.path) is True  # a's bytes were in it
    net.asked.clear()
    await read_all(src, 0, 100)
    assert net.asked == [] and origin.reads == [(0, 100)]
    assert src.reject_file(FILE.path) is False  # only the origin's bytes: nothing to exclude


async def test_listing_from_a_peer_only_for_an_anonymous_origin_and_copy() -> None:
    peer = Peer("a", "https://a:1", complete=True)
    entry = {"path": FILE.path, "size": FILE.size, "sha256": FILE.sha256}
    for anonymous_copy, credentials, listed in [
        (True, False, True),
        (False, False, False),
        (True, True, False),
    ]:
        net = Network([peer], manifests={"a": {"files": [entry], "anonymous": anonymous_copy}})
        origin = Origin(fail_listing=True, uses_credentials=credentials)
        src = PeerSource(origin, KEY, net, TUNING)
        if listed:
            assert await src.list_files() == [FILE]
        else:
            with pytest.raises(SourceUnavailableError):
                await src.list_files()


async def test_announce_once_and_finish_on_close() -> None:
    net = Network(fetching("a"))
    origin = Origin()
    src = PeerSource(origin, KEY, net, TUNING)
    await read_all(src, 0, 100)
    await read_all(src, 100, 200)
    await src.aclose()
    assert net.events == ["announce", "finish"] and origin.closed


def test_route_wraps_remote_origins_only_and_keys_by_the_uri() -> None:
    net = Network([])
    settings = FetchSettings(peers=net)
    for uri in [
        "hf://acme/llama@main",
        "s3://models-bucket/p",
        "gs://models-bucket/p",
        "http://h/m/",
        "https://h/m/",
    ]:
        src = wrap_source(Origin(), uri, settings)  # type: ignore[arg-type]
        assert isinstance(src, PeerSource)
        assert src.key == parse_model_uri(uri).cache_key
    for uri in ["file:///models/llama", "pvc://claim/llama"]:
        origin = Origin()
        assert wrap_source(origin, uri, settings) is origin  # type: ignore[arg-type]
    origin = Origin()
    assert wrap_source(origin, "hf://acme/llama", None) is origin  # type: ignore[arg-type]
    assert wrap_source(origin, "hf://acme/llama", FetchSettings()) is origin  # type: ignore[arg-type]
    assert source_wrapper(None) is None
    wrap = source_wrapper(settings)
    assert wrap is not None and isinstance(wrap(Origin(), "hf://acme/llama"), PeerSource)  # type: ignore[arg-type]


def test_route_prefers_the_dragonfly_daemon_where_it_can_fetch_and_meters_peer_bytes(
    tmp_path: Any,
) -> None:
    from sidecar.modelsource import parse_model_arg
    from sidecar.sources import open_source
    from sidecar.sources.dragonfly import DragonflySource

    seen: list[tuple[str, int]] = []
    settings = FetchSettings(
        peers=Network([]),
        dragonfly_socket=str(tmp_path / "dfdaemon.sock"),
        meter=lambda via, n: seen.append((via, n)),
    )
    http = open_source(parse_model_arg("m=http://127.0.0.1:9/model/"))
    assert isinstance(wrap_source(http, "http://127.0.0.1:9/model/", settings), DragonflySource)
    # an origin the daemon cannot fetch (no URL to name) goes to the peers
    s3 = Origin()
    src = wrap_source(s3, "s3://models-bucket/llama", settings)  # type: ignore[arg-type]
    assert isinstance(src, PeerSource) and src.meter is settings.meter


async def test_peer_bytes_are_metered_as_peer() -> None:
    seen: list[tuple[str, int]] = []
    net = Network([Peer("a", "https://a:1", complete=True)], has={"a": (0, 1000)})
    src = PeerSource(Origin(), KEY, net, TUNING, meter=lambda via, n: seen.append((via, n)))
    await read_all(src, 0, 100)
    assert seen == [("peer", 100)]
