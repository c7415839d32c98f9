"""Two node plugins with peers on: a pod's publish on one node is filled from the other's cache.

Each node is ``python -m sidecar csi`` in its own mount namespace with its own node cache
(as in ``test_csi_plugin.py``), both talking to one Kubernetes API stand-in for the node
objects. Node A runs the peer server (``--peer-listen``), node B only fetches from peers
(``--peer-tls-dir`` alone, as the plugin runs beside an agent that serves). Both certificates
are issued at start from an agents' CA made for the test. The origin is the fake Hugging
Face hub with a private repo: the fill on B takes every byte from A while the hub answers
only the listing, and a pod whose token the hub refuses is still refused on B although A
holds the model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from certs.issue import issue_ca
from sidecar.modelsource import parse_model_arg
from sidecar.node.peers import (
    ANNOUNCE_TTL,
    FETCHING_PREFIX,
    PEER_ANNOTATION,
    KubePeerNetwork,
    NodeDirectory,
    PeerTLS,
    claims_dir,
    parse_announcement,
)
from tests.e2e.test_csi_plugin import (
    HUB_TOKEN,
    Plugin,
    Pod,
    _skip_reason,
    key_of,
    models_attr,
    wait_for_view,
)
from tests.fixtures.kube_nodes import NODES, FakeNodeAPI
from tests.fixtures.modelgen import generate_model
from tests.fixtures.nobody import open_to_others
from tests.fixtures.servers import ServedModel, fake_hf_hub

REPO = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture
def reachable_by_nobody() -> Iterator[None]:
    """The uid 65534 processes import this checkout's code with its virtual environment."""
    with open_to_others(REPO, Path(sys.prefix)):
        yield


@pytest.fixture
def private(tmp_path: Path) -> Iterator[ServedModel]:
    """A private hub repo (HUB_TOKEN): 3 weight shards with sha256, plus metadata files."""
    root = tmp_path / "hub"
    info = generate_model(root / "acme" / "fleet-llama", total_bytes=3 << 20, shards=3, seed=5)
    with fake_hf_hub(root, token=HUB_TOKEN) as hub:
        yield ServedModel("hf://acme/fleet-llama", hub, info)


@pytest.fixture
def nodes_root() -> Iterator[Path]:
    # readable by the pod's user (65534), like test_csi_plugin's plugin_root
    root = Path(tempfile.mkdtemp(prefix="modelcache-csi-peers-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Fleet:
    a: Plugin
    b: Plugin
    kube: FakeNodeAPI

    def annotations(self, node: str) -> dict[str, str]:
        obj = self.kube.get(f"{NODES}/{node}")
        assert obj is not None
        return dict(obj["metadata"].get("annotations") or {})


@pytest.fixture
def fleet(nodes_root: Path, kube_nodes: FakeNodeAPI, private: ServedModel) -> Iterator[Fleet]:
    ca_cert, ca_key = issue_ca("modelcache-agents test")
    kubeconfig = kube_nodes.write_kubeconfig(nodes_root / "kubeconfig")
    started: list[Plugin] = []
    try:
        for name, listen in (("node-a", True), ("node-b", False)):
            kube_nodes.add_node(name)
            root = nodes_root / name
            root.mkdir(mode=0o755)
            tls = root / "tls"
            tls.mkdir(mode=0o700)
            (tls / "ca.crt").write_bytes(ca_cert)
            (tls / "ca.key").write_bytes(ca_key)
            args = [f"--peer-tls-dir={tls}"]
            if listen:
                args.append("--peer-listen=127.0.0.1:0")
            env = {
                "NODE_NAME": name,
                "KUBECONFIG": str(kubeconfig),
                "HF_ENDPOINT": private.server.rstrip("/"),
                # a valid token of the node's own, which must never be lent to a pod
                "HF_TOKEN": HUB_TOKEN,
            }
            started.append(Plugin(root, env=env, extra_args=tuple(args)))
        yield Fleet(started[0], started[1], kube_nodes)
    finally:
        for p in started:
            p.stop()
    for p in started:
        assert "Traceback" not in p.log(), p.log()
        assert p.proc.returncode == 0, p.log()


def wait_until(what: str, check: object, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, f"{what}: not after {deadline}s"
        time.sleep(0.05)  # polling the API stand-in, bounded by `end`


@needs_root
def test_publish_on_b_is_filled_from_a_and_the_access_check_stays_with_the_origin(
    fleet: Fleet, private: ServedModel
) -> None:
    key = key_of(private.url)
    attrs = models_attr(llm=private.url)
    peer_url = fleet.annotations("node-a")[PEER_ANNOTATION]
    assert peer_url.startswith("https://127.0.0.1:")
    assert PEER_ANNOTATION not in fleet.annotations("node-b")  # B serves nothing

    # node A: a pod's publish fills A's cache from the hub
    owner = Pod.new("owner")
    req_a = fleet.a.request(owner, "modelcache-models", attrs, {"HF_TOKEN": HUB_TOKEN})
    fleet.a.publish(req_a)
    wait_for_view(fleet.a, req_a, key, private.info)
    wait_until(
        "node-a announces its complete copy",
        lambda: (
            parse_announcement(fleet.annotations("node-a").get(FETCHING_PREFIX + key), time.time())
            == "complete"
        ),
    )
    files_before = private.server.stats.file_requests
    bytes_before = private.server.stats.bytes_sent

    # node B: the same model for another pod with its own valid token, every byte from A
    reader = Pod.new("reader", namespace="team-c")
    req_b = fleet.b.request(reader, "modelcache-models", attrs, {"HF_TOKEN": HUB_TOKEN})
    fleet.b.publish(req_b)
    wait_for_view(fleet.b, req_b, key, private.info)
    assert private.server.stats.file_requests == files_before, "the hub sent file bytes"
    assert private.server.stats.bytes_sent == bytes_before
    assert private.server.stats.api_requests > 0  # the listing with the pod's token
    wait_until(
        "node-b announces its complete copy",
        lambda: (
            parse_announcement(fleet.annotations("node-b").get(FETCHING_PREFIX + key), time.time())
            == "complete"
        ),
    )

    # a pod with a token the hub refuses is refused on B, though A (and now B) hold it
    for why, secrets in {"wrong token": {"HF_TOKEN": "hf_guess"}, "no Secret": {}}.items():
        thief = Pod.new("thief", namespace="team-b")
        req = fleet.b.request(thief, "modelcache-models", attrs, secrets)
        with pytest.raises(grpc.RpcError) as err:
            fleet.b.publish_once(req)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, why
        assert "pod team-b/thief may not read model 'llm'" in (err.value.details() or ""), why
        assert not Path(req.target_path).exists(), why
    for p in (fleet.a, fleet.b):
        assert HUB_TOKEN not in p.log()


def test_the_plugin_refuses_fetch_flags_it_cannot_use(tmp_path: Path) -> None:
    """Bad fetch flags fail at start (exit 2) with the flag named, before any socket."""
    tls = tmp_path / "tls"
    tls.mkdir()
    base = [sys.executable, "-m", "sidecar", "csi", f"--cache-dir={tmp_path / 'c'}"]
    base += ["--node-id=node-a", f"--csi-endpoint=unix://{tmp_path / 'csi.sock'}"]
    cases = {
        ("--peer-listen=127.0.0.1:0",): "--peer-listen needs --peer-tls-dir",
        ("--peer-listen=node-a:9443", f"--peer-tls-dir={tls}"): "expected IP:PORT",
        ("--dragonfly-socket=dfdaemon.sock",): "--dragonfly-socket dfdaemon.sock: must be",
        (f"--peer-tls-dir={tmp_path / 'none'}",): "it must hold ca.crt",
        (f"--peer-tls-dir={tls}",): "nodes find their peers through the Kubernetes API",
    }
    ca_cert, ca_key = issue_ca("modelcache-agents test")
    (tls / "ca.crt").write_bytes(ca_cert)
    (tls / "ca.key").write_bytes(ca_key)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
    }
    for flags, message in cases.items():
        proc = subprocess.run(
            [*base, *flags], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 2, (flags, proc.stderr)
        assert message in proc.stderr, (flags, proc.stderr)
        assert not (tmp_path / "csi.sock").exists(), flags


async def test_agent_and_plugin_of_one_node_keep_one_announcement(
    kube_nodes: FakeNodeAPI, tmp_path: Path
) -> None:
    """The agent's pre-warm and the node plugin's fill of one model on one node share the
    node's annotation: the first to finish leaves it (and the other's claims) alone while
    the other still fetches; the last one removes it. A mark not renewed for longer than
    ANNOUNCE_TTL (a process that died) does not hold it."""
    kube_nodes.add_node("node-a")
    ca_cert, ca_key = issue_ca("modelcache-agents test")
    tls = PeerTLS.issue(ca_cert, ca_key, node="node-a", ips=[])
    cache = tmp_path / "cache"
    cache.mkdir()
    key = parse_model_arg("llm=hf://acme/fleet-llama").source.cache_key
    annotation = FETCHING_PREFIX + key

    def state() -> str | None:
        obj = kube_nodes.get(f"{NODES}/node-a")
        assert obj is not None
        value = (obj["metadata"].get("annotations") or {}).get(annotation)
        return parse_announcement(value, time.time())

    agent, plugin = (
        KubePeerNetwork(NodeDirectory(kube_nodes.api_client()), "node-a", tls, cache)
        for _ in range(2)
    )
    try:
        await agent.announce(key)
        await plugin.announce(key)
        release = plugin.claim(key, "model-00001.safetensors", 0, 1 << 20)
        [claim] = [c for c in claims_dir(cache, key).iterdir() if not c.name.startswith(".")]
        await agent.finish(key)
        assert state() == "fetching"  # the plugin still fetches
        assert claim.exists()  # and its claim still tells the peers to wait for the range
        assert len(list(claims_dir(cache, key).glob(".fetching-*"))) == 1
        release()
        await plugin.finish(key)
        assert state() is None
        assert not claims_dir(cache, key).exists()

        # a process that died while fetching: its mark goes stale and holds nothing
        await agent.announce(key)
        await plugin.announce(key)
        for mark in claims_dir(cache, key).glob(".fetching-*"):
            os.utime(mark, (time.time() - ANNOUNCE_TTL - 5,) * 2)
        await agent.finish(key)
        assert state() is None
    finally:
        await agent.aclose()
        await plugin.aclose()
