"""Pure parts of peer fetch: announcements, holders, rendezvous order, settings parsing."""

from __future__ import annotations

import collections
import time

import pytest

from sidecar.agent import LABEL_PREFIX
from sidecar.node.peers import (
    ANNOUNCE_TTL,
    COMPLETE_TTL,
    FETCHING_PREFIX,
    PEER_ANNOTATION,
    NodeInfo,
    PeerSetupError,
    announcement,
    holders_of,
    is_claimed,
    parse_announcement,
    parse_listen,
    stale_announcements,
    valid_peer_url,
    write_claim,
)
from sidecar.sources.peer import Peer, rank_nodes

KEY = "tiny-llama-0123456789ab"
NOW = 1_800_000_000.0


def node(
    name: str, *, ready: bool = False, fetching: str | None = None, url: str | None = ""
) -> NodeInfo:
    labels = {LABEL_PREFIX + KEY: "ready"} if ready else {}
    annotations = {}
    if url is not None:
        annotations[PEER_ANNOTATION] = url or f"https://10.0.0.{len(name)}:9443"
    if fetching is not None:
        annotations[FETCHING_PREFIX + KEY] = fetching
    return NodeInfo(name, labels, annotations)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (announcement("fetching", NOW), "fetching"),
        (announcement("fetching", NOW - ANNOUNCE_TTL + 1), "fetching"),
        (announcement("fetching", NOW - ANNOUNCE_TTL - 1), None),  # stopped renewing: gone
        (announcement("complete", NOW - ANNOUNCE_TTL - 1), "complete"),
        (announcement("complete", NOW - COMPLETE_TTL - 1), None),
        ("fetching", None),
        ("fetching soon", None),
        ("done 1800000000", None),
        ("", None),
        (None, None),
    ],
)
def test_announcements_count_only_while_fresh(value: str | None, expected: str | None) -> None:
    assert parse_announcement(value, NOW) == expected


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("https://10.1.2.3:9443", True),
        ("https://[fd00::1]:9443/", True),
        ("http://10.1.2.3:9443", False),  # never plain HTTP
        ("https://10.1.2.3", False),  # no port
        ("https://10.1.2.3:9443/steal", False),
        ("https://10.1.2.3:99999", False),
        ("", False),
        (None, False),
    ],
)
def test_peer_urls(value: str | None, ok: bool) -> None:
    assert (valid_peer_url(value) is not None) is ok


def test_holders_are_labelled_or_announced_nodes_with_an_address() -> None:
    nodes = [
        node("ready", ready=True),
        node("fetch", fetching=announcement("fetching", NOW - 5)),
        node("done", fetching=announcement("complete", NOW - 500)),
        node("stale", fetching=announcement("fetching", NOW - ANNOUNCE_TTL - 5)),
        node("noaddr", ready=True, url=None),
        node("badaddr", ready=True, url="http://10.0.0.9:80"),
        node("other"),
    ]
    got = holders_of(nodes, KEY, NOW)
    assert [(p.node, p.complete, p.fetching) for p in got] == [
        ("done", True, False),
        ("fetch", False, True),
        ("ready", True, False),
    ]
    # a node both labelled and still announcing counts as complete only
    both = holders_of([node("x", ready=True, fetching=announcement("fetching", NOW))], KEY, NOW)
    assert both == [Peer("x", "https://10.0.0.1:9443", complete=True, fetching=False)]


def test_stale_announcements_are_removed_and_fresh_ones_kept() -> None:
    other = "other-key-0123456789ab"
    info = NodeInfo(
        "n",
        {LABEL_PREFIX + KEY: "ready"},
        {
            FETCHING_PREFIX + KEY: announcement("complete", NOW),  # labelled now: not needed
            FETCHING_PREFIX + other: announcement("fetching", NOW - 1),  # running
            FETCHING_PREFIX + "gone-0123456789ab": announcement("fetching", NOW - 3600),
            PEER_ANNOTATION: "https://10.0.0.1:9443",
            "unrelated.example.com/x": "y",
        },
    )
    assert stale_announcements(info, NOW) == {
        FETCHING_PREFIX + KEY: None,
        FETCHING_PREFIX + "gone-0123456789ab": None,
    }


def test_rendezvous_order_is_the_same_everywhere_and_spreads_owners() -> None:
    nodes = [f"node-{i}" for i in range(8)]
    orders = [rank_nodes(nodes, KEY, "model.safetensors", p) for p in range(800)]
    assert orders[3] == rank_nodes(list(reversed(nodes)), KEY, "model.safetensors", 3)
    owners = collections.Counter(o[0] for o in orders)
    assert set(owners) == set(nodes)
    assert max(owners.values()) < 2 * 800 / 8  # no node owns twice its share
    # one node more moves only the pieces the new node now owns
    grown = [rank_nodes([*nodes, "node-8"], KEY, "model.safetensors", p)[0] for p in range(800)]
    moved = [p for p in range(800) if grown[p] != orders[p][0]]
    assert all(grown[p] == "node-8" for p in moved)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:9443", ("0.0.0.0", 9443)),
        ("[::]:9443", ("::", 9443)),
        ("10.1.2.3:0", ("10.1.2.3", 0)),
    ],
)
def test_listen_addresses(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9443", "node-a:9443", "10.1.2.3:", "10.1.2.3:70000", ":9443"])
def test_bad_listen_addresses_name_the_flag(value: str) -> None:
    with pytest.raises(PeerSetupError, match="--peer-listen"):
        parse_listen(value)


def test_claims_overlap_and_expire(tmp_path) -> None:  # type: ignore[no-untyped-def]
    claim = write_claim(tmp_path, KEY, "a/model.safetensors", 100, 200)
    now = time.time()
    assert is_claimed(tmp_path, KEY, "a/model.safetensors", 150, 300, now=now)
    assert not is_claimed(tmp_path, KEY, "a/model.safetensors", 200, 300, now=now)
    assert not is_claimed(tmp_path, KEY, "b/model.safetensors", 100, 200, now=now)
    assert not is_claimed(tmp_path, "other-key", "a/model.safetensors", 100, 200, now=now)
    assert not is_claimed(tmp_path, KEY, "a/model.safetensors", 100, 200, now=now + 3600)
    claim.unlink()
    assert not is_claimed(tmp_path, KEY, "a/model.safetensors", 100, 200, now=now)
