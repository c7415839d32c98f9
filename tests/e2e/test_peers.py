"""Peer fetch between node agents, on loopback, with everything real.

Each node is a node cache in its own directory plus the agent's peer service
(``sidecar.node.peers.start_peers``): an HTTPS server with mutual TLS (certificates issued by
``certs.issue`` from an agents' CA made for the test) and the peer network that finds
holders through the Kubernetes API stand-in (labels ``cache.modelcache.io/<key>=ready``,
annotations ``modelcache.io/peer`` and ``fetching.modelcache.io/<key>``). Fetches go through
the node side's engine, ``warm_models`` with the route's ``wrap_source``, as the node plugin
and the agent's pre-warm run it. Origins are the fake Hugging Face hub (which gives sha256
for weight files, so a corrupt peer is caught) and the fault-injecting autoindex server
(slow, for a fetch still in progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from certs.issue import issue_bundle, issue_ca, issue_leaf
from sidecar.agent import LABEL_PREFIX, LABEL_READY
from sidecar.cache import NodeCache
from sidecar.layout import ANONYMOUS_MARKER
from sidecar.modelsource import NamedModel, parse_model_arg
from sidecar.node.peers import (
    FETCHING_PREFIX,
    PEER_ANNOTATION,
    KubePeerNetwork,
    NodeDirectory,
    PeerServer,
    PeerService,
    PeerTLS,
    start_peers,
)
from sidecar.node.publish import (
    ErrorKind,
    PluginConfig,
    PodInfo,
    Publisher,
    PublishError,
    VolumeSpec,
)
from sidecar.sources import Source
from sidecar.sources.peer import PeerSource, PeerTuning
from sidecar.sources.route import FetchSettings, wrap_source
from sidecar.warmup import WarmupError, warm_models
from tests.fixtures.kube_nodes import NODES, FakeNodeAPI
from tests.fixtures.modelgen import ModelInfo, generate_model, sha256_file
from tests.fixtures.servers import Faults, ServerURL, fake_hf_hub, fault_server, free_port

PART = 256 << 10
#: quick decisions for loopback: nothing here is slow unless a test makes it so
FAST = PeerTuning(stall=2.0, wait=5.0, join_window=0.0, piece=PART)


@dataclass
class CA:
    cert: bytes
    key: bytes


@pytest.fixture(scope="module")
def agents_ca() -> CA:
    cert, key = issue_ca("modelcache-agents test")
    return CA(cert, key)


@dataclass
class Node:
    name: str
    cache: NodeCache
    service: PeerService
    tls: PeerTLS
    made: list[PeerSource] = field(default_factory=list)

    @property
    def server(self) -> PeerServer:
        assert self.service.server is not None
        return self.service.server

    def wrap(self, tuning: PeerTuning = FAST) -> Callable[[Source, str], Source]:
        settings = FetchSettings(peers=self.service.network, peer_tuning=tuning)

        def wrap(origin: Source, uri: str) -> Source:
            src = wrap_source(origin, uri, settings)
            assert isinstance(src, PeerSource)
            self.made.append(src)
            return src

        return wrap

    @property
    def source(self) -> PeerSource:
        assert self.made, "no fetch through peers ran on this node"
        return self.made[-1]


class Cluster:
    """Nodes on the API stand-in, each with its node cache and peer service."""

    def __init__(self, kube: FakeNodeAPI, ca: CA, root: Path) -> None:
        self.kube = kube
        self.ca = ca
        self.root = root
        self.nodes: dict[str, Node] = {}

    async def add(self, name: str, server_cls: type[PeerServer] = PeerServer) -> Node:
        self.kube.add_node(name)
        tls = PeerTLS.issue(self.ca.cert, self.ca.key, node=name, ips=["127.0.0.1"])
        cache = NodeCache(self.root / name, part_size=PART, backoff=0.01)
        if server_cls is PeerServer:
            service = await start_peers(
                self.kube.api_client(),
                node=name,
                cache_dir=cache.cache_dir,
                tls=tls,
                listen="127.0.0.1:0",
            )
        else:
            directory = NodeDirectory(self.kube.api_client())
            service = PeerService(KubePeerNetwork(directory, name, tls, cache.cache_dir))
            service.server = server_cls(cache.cache_dir, tls)
            url = await service.server.start("127.0.0.1", 0)
            await directory.annotate(name, {PEER_ANNOTATION: url})
        node = Node(name, cache, service, tls)
        self.nodes[name] = node
        return node

    def mark_ready(self, node: str, key: str) -> None:
        """What the node's agent does on its next pass once the model is complete."""
        obj = self.kube.get(f"{NODES}/{node}")
        assert obj is not None
        obj["metadata"].setdefault("labels", {})[LABEL_PREFIX + key] = LABEL_READY
        self.kube.put(f"{NODES}/{node}", obj)

    def annotations(self, node: str) -> dict[str, str]:
        obj = self.kube.get(f"{NODES}/{node}")
        assert obj is not None
        return dict(obj["metadata"].get("annotations") or {})

    async def aclose(self) -> None:
        for node in self.nodes.values():
            await node.service.aclose()


@pytest.fixture
async def cluster(kube_nodes: FakeNodeAPI, agents_ca: CA, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(kube_nodes, agents_ca, tmp_path / "nodes")
    try:
        yield c
    finally:
        await c.aclose()


@dataclass
class Hub:
    url: ServerURL
    info: ModelInfo
    model: NamedModel

    @property
    def key(self) -> str:
        return self.model.source.cache_key

    @property
    def env(self) -> dict[str, str]:
        return self.url.env()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    """A public hub repo (no token): 3 weight shards with sha256, plus the metadata files."""
    root = tmp_path / "hub"
    info = generate_model(root / "acme" / "peer-llama", total_bytes=3 << 20, shards=3, seed=7)
    with fake_hf_hub(root) as url:
        yield Hub(url, info, parse_model_arg("llm=hf://acme/peer-llama"))


async def fill(
    node: Node, model: NamedModel, env: dict[str, str], *, peers: bool = True, **kw: Any
) -> Any:
    return await warm_models(
        node.cache,
        [model],
        env=env,
        wrap=node.wrap(kw.pop("tuning", FAST)) if peers else None,
        **kw,
    )


def assert_same_files(node: Node, model: NamedModel, info: ModelInfo) -> None:
    data = node.cache.model_dir(model).data
    for rel, gen in info.files.items():
        assert sha256_file(data / rel) == gen.sha256, rel
    assert node.cache.is_complete(model)


def weights_bytes(info: ModelInfo) -> int:
    return sum(info.files[p].size for p in info.weight_files)


# ---- a complete peer ----------------------------------------------------------------------------


async def test_complete_peer_serves_the_bytes_and_the_origin_only_the_listing(
    cluster: Cluster, hub: Hub
) -> None:
    a = await cluster.add("node-a")
    b = await cluster.add("node-b")
    await fill(a, hub.model, hub.env, peers=False)
    cluster.mark_ready("node-a", hub.key)
    sent_before = hub.url.stats.bytes_sent

    report = await fill(b, hub.model, hub.env)

    assert_same_files(b, hub.model, hub.info)
    assert report.fetched_bytes == hub.info.total_bytes
    assert b.source.counts.origin == 0
    assert b.source.counts.peers == {"node-a": hub.info.total_bytes}
    assert hub.url.stats.bytes_sent == sent_before  # the hub gave the listing, no file bytes
    assert a.server.bytes_served == hub.info.total_bytes
    # b announced its fetch and, complete now, says so until its agent labels it
    assert cluster.annotations("node-b")[FETCHING_PREFIX + hub.key].startswith("complete ")
    assert cluster.annotations("node-a")[PEER_ANNOTATION] == a.server.url


async def test_peer_without_the_model_sends_the_fetch_to_the_origin(
    cluster: Cluster, hub: Hub
) -> None:
    await cluster.add("node-a")  # labelled ready, but its cache does not hold the model
    b = await cluster.add("node-b")
    cluster.mark_ready("node-a", hub.key)
    sent_before = hub.url.stats.bytes_sent

    await fill(b, hub.model, hub.env)

    assert_same_files(b, hub.model, hub.info)
    assert b.source.counts.peers == {}
    assert b.source.counts.origin == hub.info.total_bytes
    assert hub.url.stats.bytes_sent - sent_before == hub.info.total_bytes


async def test_an_api_that_fails_costs_the_fetch_nothing_but_its_peers(
    cluster: Cluster, hub: Hub
) -> None:
    """The API stand-in answers the node's announcement and node lists with errors and
    dropped connections: the fetch reads the origin and completes."""
    a = await cluster.add("node-a")
    b = await cluster.add("node-b")
    await fill(a, hub.model, hub.env, peers=False)
    cluster.mark_ready("node-a", hub.key)
    cluster.kube.fail_next(100, "500", method="PATCH")
    cluster.kube.fail_next(100, "drop", method="GET", path=NODES)
    sent_before = hub.url.stats.bytes_sent

    await fill(b, hub.model, hub.env)

    assert_same_files(b, hub.model, hub.info)
    assert b.source.counts.peers == {}
    assert hub.url.stats.bytes_sent - sent_before == hub.info.total_bytes
    assert a.server.bytes_served == 0


# ---- a peer that dies mid-transfer --------------------------------------------------------------


class DyingServer(PeerServer):
    """Sends the first MiB of the first file it serves, then the process 'dies': the
    connection is cut and the server stops listening."""

    died = False

    async def _stream(
        self, request: web.Request, fd: int, start: int, end: int, size: int
    ) -> web.StreamResponse:
        if self.died:
            os.close(fd)
            raise web.HTTPServiceUnavailable()
        try:
            resp = web.StreamResponse(status=206, headers=self._headers(start, end, size))
            resp.content_length = end - start
            await resp.prepare(request)
            await resp.write(os.pread(fd, min(end - start, 64 << 10), start))
            self.bytes_served += min(end - start, 64 << 10)
            self.died = True
            assert request.transport is not None
            request.transport.abort()
            asyncio.get_running_loop().create_task(self.stop())
            return resp
        finally:
            os.close(fd)


async def test_peer_that_dies_mid_transfer_leaves_the_rest_to_the_origin(
    cluster: Cluster, hub: Hub
) -> None:
    a = await cluster.add("node-a", server_cls=DyingServer)
    b = await cluster.add("node-b")
    await fill(a, hub.model, hub.env, peers=False)
    cluster.mark_ready("node-a", hub.key)
    sent_before = hub.url.stats.bytes_sent

    await fill(b, hub.model, hub.env, parallel=1)

    assert_same_files(b, hub.model, hub.info)
    got_from_a = b.source.counts.peers.get("node-a", 0)
    assert 0 < got_from_a <= 64 << 10  # what arrived before it died was kept, not refetched
    assert b.source.counts.origin == hub.info.total_bytes - got_from_a
    assert hub.url.stats.bytes_sent - sent_before == hub.info.total_bytes - got_from_a


class StallingServer(PeerServer):
    """Sends the first 64 KiB of every range, then nothing more (a peer stuck on its disk
    or its network), keeping the connection open."""

    async def _stream(
        self, request: web.Request, fd: int, start: int, end: int, size: int
    ) -> web.StreamResponse:
        try:
            resp = web.StreamResponse(status=206, headers=self._headers(start, end, size))
            resp.content_length = end - start
            await resp.prepare(request)
            await resp.write(os.pread(fd, min(end - start, 64 << 10), start))
            self.bytes_served += min(end - start, 64 << 10)
            await asyncio.Event().wait()  # until the client gives up and the server stops
            return resp
        finally:
            os.close(fd)


async def test_a_stalled_peer_is_left_after_the_stall_threshold(cluster: Cluster, hub: Hub) -> None:
    a = await cluster.add("node-a", server_cls=StallingServer)
    b = await cluster.add("node-b")
    await fill(a, hub.model, hub.env, peers=False)
    cluster.mark_ready("node-a", hub.key)
    tuning = PeerTuning(stall=0.5, wait=5, join_window=0, piece=PART)
    loop = asyncio.get_running_loop()
    started = loop.time()

    await fill(b, hub.model, hub.env, tuning=tuning, parallel=4)

    took = loop.time() - started
    assert_same_files(b, hub.model, hub.info)
    src = b.source
    from_a = src.counts.peers.get("node-a", 0)
    assert from_a > 0  # what came before each stall was kept
    assert src.counts.origin == hub.info.total_bytes - from_a
    # each range waited one stall threshold (four at a time), not a read timeout
    parts = sum(-(-f.size // PART) for f in hub.info.files.values())
    assert took < (parts / 4 + 2) * tuning.stall + 10


# ---- a peer that serves corrupt bytes -----------------------------------------------------------


def resolves(hub: Hub, relpath: str) -> int:
    """The hub's file requests for ``relpath`` so far (any revision)."""
    return sum(n for p, n in hub.url.stats.per_path.items() if p.endswith(f"/{relpath}"))


def corrupt_in_place(node: Node, model: NamedModel, relpath: str) -> None:
    """Flip bytes of a complete file and record the new stamp, as a broken or hostile peer
    would: its own checks pass, its bytes are wrong."""
    md = node.cache.model_dir(model)
    path = md.data_file(relpath)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for offset in range(100, size, 32 << 10):  # in every piece a peer may be asked for
            f.seek(offset)
            f.write(b"\xff" * 16)
    meta_path = md.file_meta(relpath)
    import json

    from sidecar.cache import file_stamp

    meta = json.loads(meta_path.read_bytes())
    meta["stamp"] = file_stamp(path.stat())
    meta_path.write_text(json.dumps(meta))


async def test_corrupt_peer_bytes_fail_verification_and_are_fetched_elsewhere(
    cluster: Cluster, hub: Hub
) -> None:
    a = await cluster.add("node-a")
    b = await cluster.add("node-b")
    await fill(a, hub.model, hub.env, peers=False)
    cluster.mark_ready("node-a", hub.key)
    shard = hub.info.weight_files[0]
    corrupt_in_place(a, hub.model, shard)
    size = hub.info.files[shard].size
    sent_before = hub.url.stats.bytes_sent
    resolves_before = resolves(hub, shard)

    await fill(b, hub.model, hub.env)

    assert_same_files(b, hub.model, hub.info)
    src = b.source
    assert "node-a" in src.rejected
    assert resolves(hub, shard) > resolves_before  # fetched again, from the hub
    # a sent every file once (the corrupt shard included) and was never asked again: the
    # shard's second fetch and every file after the rejection came from the origin
    assert a.server.bytes_served == src.counts.peers["node-a"]
    assert src.counts.origin >= size
    assert hub.url.stats.bytes_sent - sent_before == src.counts.origin
    assert src.counts.origin + src.counts.peers["node-a"] == hub.info.total_bytes + size


async def test_corrupt_peer_is_left_for_an_honest_one(cluster: Cluster, hub: Hub) -> None:
    """With only a corrupt peer and an honest one holding the model, the file is taken
    again without the corrupt peer; the origin sends nothing but the listing."""
    bad = await cluster.add("node-bad")
    good = await cluster.add("node-good")
    b = await cluster.add("node-b")
    for holder in (bad, good):
        await fill(holder, hub.model, hub.env, peers=False)
        cluster.mark_ready(holder.name, hub.key)
    for shard in hub.info.weight_files:
        corrupt_in_place(bad, hub.model, shard)
    sent_before = hub.url.stats.bytes_sent

    await fill(
        b, hub.model, hub.env, tuning=PeerTuning(stall=2, wait=5, join_window=0, piece=64 << 10)
    )

    assert_same_files(b, hub.model, hub.info)
    assert "node-bad" in b.source.rejected
    assert hub.url.stats.bytes_sent - sent_before == b.source.counts.origin


# ---- the origin unreachable, a complete peer ----------------------------------------------------


async def test_origin_unreachable_fetch_completes_from_a_complete_peer(
    cluster: Cluster, hub: Hub
) -> None:
    a = await cluster.add("node-a")
    b = await cluster.add("node-b")
    await fill(a, hub.model, hub.env, peers=False)
    cluster.mark_ready("node-a", hub.key)
    assert (a.cache.model_dir(hub.model).root / ANONYMOUS_MARKER).is_file()
    down = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}

    # the agent's pre-warm (no pod involved): listing and bytes from node-a's anonymous copy
    await fill(b, hub.model, down)
    assert_same_files(b, hub.model, hub.info)
    assert b.source.counts.peers == {"node-a": hub.info.total_bytes}
    assert (b.cache.model_dir(hub.model).root / ANONYMOUS_MARKER).is_file()

    # publishing to pods: the access check lists the origin with each pod's credentials, as
    # before. A pod with a token cannot be checked while the hub is down: refused.
    publisher = Publisher(
        PluginConfig(cache_dir=b.cache.cache_dir, check_timeout=5), cache=b.cache, node_env=down
    )
    spec = VolumeSpec("view", (hub.model,), PodInfo("p", "team-a"))
    with pytest.raises(PublishError) as refused:
        await publisher._check_models(spec, {**down, "HF_TOKEN": "hf_other"})
    assert refused.value.kind is ErrorKind.UNAVAILABLE
    # a pod without credentials gets the copy that was fetched without any
    listings = await publisher._check_models(spec, down)
    assert listings["llm"].current
    await publisher.aclose()


async def test_origin_unreachable_with_credentials_is_not_listed_from_a_peer(
    cluster: Cluster, hub: Hub
) -> None:
    a = await cluster.add("node-a")
    b = await cluster.add("node-b")
    await fill(a, hub.model, hub.env, peers=False)
    cluster.mark_ready("node-a", hub.key)
    down = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": "hf_someone"}

    with pytest.raises(WarmupError) as failed:
        await fill(b, hub.model, down)
    assert failed.value.kinds == ["unreachable"]
    assert not b.cache.is_complete(hub.model)
    assert a.server.bytes_served == 0


# ---- in-flight sharing --------------------------------------------------------------------------


class Tap:
    """Wraps an origin: sets ``started`` once ``threshold`` bytes went through."""

    def __init__(self, origin: Source, threshold: int, started: asyncio.Event) -> None:
        self.origin = origin
        self.threshold = threshold
        self.seen = 0
        self.started = started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.origin, name)

    async def list_files(self) -> Any:
        return await self.origin.list_files()

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        async for chunk in self.origin.read_range(path, start, end):
            self.seen += len(chunk)
            if self.seen >= self.threshold:
                self.started.set()
            yield chunk

    async def aclose(self) -> None:
        await self.origin.aclose()


async def test_second_node_takes_ranges_from_a_node_still_fetching(
    cluster: Cluster, tmp_path: Path
) -> None:
    info = generate_model(tmp_path / "origin" / "slow-llama", total_bytes=4 << 20, shards=2, seed=9)
    faults = Faults(delay=0.05, chunk=64 << 10)
    with fault_server(tmp_path / "origin", faults) as origin:
        model = parse_model_arg(f"llm={origin}slow-llama/")
        a = await cluster.add("node-a")
        b = await cluster.add("node-b")
        started = asyncio.Event()
        wrap_a = a.wrap()

        def tapped(src: Source, uri: str) -> Source:
            return wrap_a(Tap(src, 2 * PART, started), uri)  # type: ignore[arg-type]

        fetch_a = asyncio.create_task(warm_models(a.cache, [model], parallel=4, wrap=tapped))
        async with asyncio.timeout(30):
            await started.wait()
        assert not fetch_a.done()
        assert cluster.annotations("node-a")[FETCHING_PREFIX + model.source.cache_key].startswith(
            "fetching "
        )
        await warm_models(b.cache, [model], parallel=4, wrap=b.wrap())
        await fetch_a

    for node in (a, b):
        assert_same_files(node, model, info)
    total = info.total_bytes
    from_a = b.source.counts.peers.get("node-a", 0)
    assert from_a > 0
    # every byte crossed the origin's link about once, not once per node
    assert origin.stats.bytes_sent == a.source.counts.origin + b.source.counts.origin
    assert origin.stats.bytes_sent < 1.5 * total
    assert a.source.counts.origin + a.source.counts.peer_total == total
    assert b.source.counts.origin + from_a == total


# ---- who may connect ----------------------------------------------------------------------------


def _client_context(ca: bytes, pair: tuple[bytes, bytes] | None, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.decode())
    if pair is not None:
        (tmp / "c.crt").write_bytes(pair[0])
        (tmp / "c.key").write_bytes(pair[1])
        ctx.load_cert_chain(tmp / "c.crt", tmp / "c.key")
    return ctx


async def _get(url: str, ctx: ssl.SSLContext, **kw: Any) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=ctx, **kw) as resp:
        await resp.read()
        return resp.status


async def test_only_agents_with_a_certificate_of_the_agents_ca_can_fetch(
    cluster: Cluster, hub: Hub, agents_ca: CA, tmp_path: Path
) -> None:
    a = await cluster.add("node-a")
    await fill(a, hub.model, hub.env, peers=False)
    shard = hub.info.weight_files[0]
    size = hub.info.files[shard].size
    url = f"{a.server.url}/v1/models/{hub.key}/files/{shard}?size={size}"
    rng = {"Range": "bytes=0-99"}
    other = tmp_path / "c"
    other.mkdir()
    # an agent: served
    agent = PeerTLS.issue(agents_ca.cert, agents_ca.key, node="node-z", ips=["127.0.0.1"])
    assert (
        await _get(
            url,
            _client_context(agents_ca.cert, (agent.cert_pem, agent.key_pem), other),
            headers=rng,
        )
        == 206
    )

    refused = (aiohttp.ClientError, ssl.SSLError, ConnectionError)
    # a pod: no client certificate at all
    with pytest.raises(refused):
        await _get(url, _client_context(agents_ca.cert, None, other), headers=rng)
    # a certificate of another CA (the webhook's)
    webhook = issue_bundle("modelcache-webhook", "modelcache-system")
    with pytest.raises(refused):
        await _get(
            url,
            _client_context(agents_ca.cert, (webhook.cert_pem, webhook.key_pem), other),
            headers=rng,
        )
    # a serving-only certificate of the agents' CA is no client certificate
    serving = issue_leaf(agents_ca.cert, agents_ca.key, "x", "y", ips=["127.0.0.1"])
    with pytest.raises(refused):
        await _get(url, _client_context(agents_ca.cert, serving, other), headers=rng)


async def test_server_serves_nothing_outside_the_cache_or_of_another_version(
    cluster: Cluster, hub: Hub, agents_ca: CA, tmp_path: Path
) -> None:
    a = await cluster.add("node-a")
    await fill(a, hub.model, hub.env, peers=False)
    shard = hub.info.weight_files[0]
    size = hub.info.files[shard].size
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 1000)
    data = a.cache.model_dir(hub.model).data
    os.symlink(secret, data / "leak.bin")
    agent = PeerTLS.issue(agents_ca.cert, agents_ca.key, node="node-z", ips=["127.0.0.1"])
    ctx = _client_context(agents_ca.cert, (agent.cert_pem, agent.key_pem), tmp_path)
    base = f"{a.server.url}/v1/models/{hub.key}/files"
    rng = {"Range": "bytes=0-99"}
    wrong_sha = hashlib.sha256(b"other").hexdigest()
    cases = {
        f"{base}/leak.bin?size=1000": 404,  # a symlink out of the cache
        f"{base}/..%2F..%2Fsource.json?size=10": 400,
        f"{a.server.url}/v1/models/..%2F..%2Fetc/files/passwd?size=10": 400,
        f"{base}/{shard}?size={size}&sha256={wrong_sha}": 404,  # another version
        f"{base}/{shard}?size={size + 1}": 404,
        f"{base}/{shard}?size={size}&sha256={hub.info.files[shard].sha256}": 206,
    }
    got = {u: await _get(u, ctx, headers=rng) for u in cases}
    assert got == cases
    assert await _get(f"{base}/{shard}?size={size}", ctx) == 416  # no Range: not a peer client
    with contextlib.suppress(FileNotFoundError):
        (data / "leak.bin").unlink()


# ---- the agent's command line --------------------------------------------------------------------


async def test_agent_serves_its_cache_and_prewarms_through_peers(
    cluster: Cluster, hub: Hub, agents_ca: CA, tmp_path: Path
) -> None:
    """``python -m sidecar agent --peer-listen ... --once``: the agent issues its own
    certificate from the agents' CA, publishes its server's address on its node, and its
    pre-warm takes the model from the complete peer, not from the hub."""
    a = await cluster.add("node-a")
    await fill(a, hub.model, hub.env, peers=False)
    cluster.mark_ready("node-a", hub.key)
    cluster.kube.add_node("node-c")
    tls = tmp_path / "agent-tls"
    tls.mkdir()
    (tls / "ca.crt").write_bytes(agents_ca.cert)
    (tls / "ca.key").write_bytes(agents_ca.key)
    config = tmp_path / "prewarm.yaml"
    config.write_text(f"models:\n  - model: {hub.model.source.uri}\n")
    cache = tmp_path / "agent-cache"
    env = {
        **os.environ,
        **hub.env,
        "KUBECONFIG": str(cluster.kube.write_kubeconfig(tmp_path / "kubeconfig")),
    }
    sent_before = hub.url.stats.bytes_sent
    argv = [sys.executable, "-m", "sidecar", "agent", "--cache-dir", str(cache)]
    argv += ["--node", "node-c", "--once", "--prewarm-config", str(config)]
    argv += ["--peer-listen", "127.0.0.1:0", "--peer-tls-dir", str(tls)]
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(120):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()

    peer_url = cluster.annotations("node-c")[PEER_ANNOTATION]
    assert peer_url.startswith("https://127.0.0.1:")
    done = NodeCache(cache).model_dir(hub.model).data
    for rel, gen in hub.info.files.items():
        assert sha256_file(done / rel) == gen.sha256
    assert hub.url.stats.bytes_sent == sent_before  # every byte came from node-a
    assert a.server.bytes_served == hub.info.total_bytes
    assert cluster.kube.labels("node-c")[LABEL_PREFIX + hub.key] == LABEL_READY


async def test_agent_refuses_peer_flags_it_cannot_use(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node("node-c")
    env = {**os.environ, "KUBECONFIG": str(kube_nodes.write_kubeconfig(tmp_path / "kubeconfig"))}
    base = [sys.executable, "-m", "sidecar", "agent", "--cache-dir", str(tmp_path / "c")]
    base += ["--node", "node-c", "--once"]
    cases = {
        ("--peer-listen", "127.0.0.1:0"): "--peer-listen needs --peer-tls-dir",
        ("--peer-listen", "node-c:9443", "--peer-tls-dir", str(tmp_path)): "expected IP:PORT",
        ("--peer-tls-dir", str(tmp_path / "none")): "it must hold ca.crt",
        (
            "--peer-listen",
            "0.0.0.0:0",
            "--peer-tls-dir",
            str(tmp_path / "tls"),
        ): "--peer-advertise must name",
    }
    (tmp_path / "tls").mkdir()
    ca_cert, ca_key = issue_ca("agents")
    (tmp_path / "tls" / "ca.crt").write_bytes(ca_cert)
    (tmp_path / "tls" / "ca.key").write_bytes(ca_key)
    for flags, message in cases.items():
        proc = await asyncio.create_subprocess_exec(
            *base, *flags, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        assert proc.returncode == 2, (flags, err.decode())
        assert message in err.decode(), (flags, err.decode())
