"""Peer fetch: a model's bytes from other nodes' caches, its origin still the authority.

:class:`PeerSource` wraps the origin :class:`~sidecar.sources.Source` of one model:

* ``list_files`` always asks the origin (the listing is the authority: paths, sizes,
  sha256). Only when the origin cannot be reached at all *and* it is read without
  credentials does a complete peer's manifest stand in, if that peer's copy was itself
  fetched without credentials: the rule the node applies to its own cache.
* ``read_range`` takes the range from a peer that holds it: a complete peer first (spread
  over the complete peers by a hash of the range), else the in-progress peer that owns the
  range. Nodes fetching the same model at once split it: every range has one owner among
  them (rendezvous hashing over the fetching nodes), the owner reads it from the origin and
  the others wait for it, up to ``wait`` seconds. A peer that sends nothing for ``stall``
  seconds, fails, or does not have the range is left for the next candidate and finally the
  origin, from the byte where it stopped.
* Verification stays with the node cache (``sidecar.cache``): every file is checked
  against the origin's listing (size always, sha256 where the origin gives one). A file
  that fails it calls :meth:`PeerSource.reject_file`: the peers that contributed bytes to
  it are never asked again by this source, and the cache fetches the file once more.

With an origin that gives no sha256 (plain ``http(s)`` directories) peer bytes are checked
for size only: they are trusted as far as the peers are (node agents holding a certificate
of the agents' CA, see ``sidecar.node.peers``).

Nothing here knows Kubernetes or TLS: a :class:`PeerNetwork` (``sidecar.node.peers``)
finds the holders and moves the bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.sources import (
    OriginWrapper,
    RemoteFile,
    Source,
    SourceError,
    SourceUnavailableError,
)

log = logging.getLogger(__name__)

#: ``via`` of the bytes a peer sent, for a meter (the agent's ``modelcache_fetch_bytes``).
VIA_PEER = "peer"


@dataclass(frozen=True)
class Peer:
    """Another node that may hold a model: ``complete`` (labelled ready, or announced
    complete) or ``fetching`` (announced in progress)."""

    node: str
    url: str
    complete: bool = False
    fetching: bool = False


class PeerUnavailableError(Exception):
    """A peer cannot serve a range now (not held, not yet, failed, stalled); try another."""


class PeerNetwork(Protocol):
    """Finds the holders of a model and reads ranges from them (``sidecar.node.peers``)."""

    @property
    def node(self) -> str:
        """This node's name: never a peer of itself."""
        ...

    async def holders(self, key: str, *, fresh: bool = False) -> list[Peer]:
        """The other nodes that hold (or are fetching) the model ``key``; ``fresh``: read
        now, not from a recent answer."""
        ...

    async def announce(self, key: str) -> None:
        """Tell the other nodes this one is fetching ``key`` (kept fresh until ``finish``)."""
        ...

    async def finish(self, key: str) -> None:
        """This node stopped fetching ``key`` (complete or not)."""
        ...

    def read(
        self,
        peer: Peer,
        key: str,
        f: RemoteFile,
        start: int,
        end: int,
        *,
        version: str | None,
        wait: float,
        grace: float,
        stall: float,
    ) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of ``f`` from ``peer``. A peer that is reading them from
        the origin (it claimed them) is waited for, up to ``wait`` seconds; one that has not
        claimed them answers at once, or after ``grace`` seconds if it claims them meanwhile.
        :class:`PeerUnavailableError` on any failure (after yielding what arrived)."""
        ...

    def claim(self, key: str, path: str, start: int, end: int) -> Callable[[], None]:
        """Tell the other nodes this one reads ``[start, end)`` of ``path`` from the origin
        (they wait for it instead of reading it too); returns the release, for a read that
        failed. Claims of a finished fetch go with ``finish``."""
        ...

    async def manifest(self, peer: Peer, key: str) -> dict[str, Any] | None:
        """A complete peer's manifest (with ``anonymous``: fetched without credentials)."""
        ...


@dataclass(frozen=True)
class PeerTuning:
    """How long to give peers before the origin takes over."""

    #: seconds without a byte from a peer before its range goes elsewhere
    stall: float = 5.0
    #: seconds to wait for a node that reads a range from the origin to have it
    wait: float = 15.0
    #: seconds the owner of a range has to claim it before another node reads it instead
    grace: float = 1.0
    #: at most this many nodes are asked for one range before the origin
    max_asked: int = 8
    #: after announcing, seconds for the other nodes of a burst to announce too (only when
    #: no complete peer exists; longer while new ones keep coming), so the first ranges
    #: are split among all of them
    join_window: float = 1.0
    #: ranges are assigned to owners in pieces of this size
    piece: int = 1 << 20


@dataclass
class ByteCounts:
    """Bytes this source delivered, by where they came from."""

    origin: int = 0
    peers: dict[str, int] = field(default_factory=dict)

    @property
    def peer_total(self) -> int:
        return sum(self.peers.values())


def _score(node: str, key: str, path: str, piece: int) -> bytes:
    return hashlib.sha256(f"{node}\0{key}\0{path}\0{piece}".encode()).digest()


def rank_nodes(nodes: list[str], key: str, path: str, piece: int) -> list[str]:
    """``nodes`` by their rendezvous score for one piece, best first (pure): every node
    computes the same order from the same names."""
    return sorted(nodes, key=lambda n: _score(n, key, path, piece), reverse=True)


class PeerSource(OriginWrapper):
    """The origin of one model, with ranges read from peers where they hold them."""

    def __init__(
        self,
        origin: Source,
        key: str,
        network: PeerNetwork,
        tuning: PeerTuning | None = None,
        *,
        meter: Callable[[str, int], None] | None = None,
    ) -> None:
        self.origin = origin
        self.meter = meter
        self.key = key
        self.network = network
        self.tuning = tuning or PeerTuning()
        self.counts = ByteCounts()
        self._listed: dict[str, RemoteFile] = {}
        self._rejected: set[str] = set()
        self._contributors: dict[str, set[str]] = {}
        self._joined: asyncio.Task[None] | None = None
        self._announced = False

    @property
    def rejected(self) -> frozenset[str]:
        """The peers this source no longer asks: they sent bytes of a file that failed
        verification."""
        return frozenset(self._rejected)

    # ---- what the origin says -------------------------------------------------------------

    async def list_files(self) -> list[RemoteFile]:
        try:
            files = await self.origin.list_files()
        except SourceUnavailableError as exc:
            files = await self._peer_listing(exc)
        self._listed = {f.path: f for f in files}
        return files

    async def _peer_listing(self, exc: SourceUnavailableError) -> list[RemoteFile]:
        """The origin is down: a complete peer's listing, only for an anonymous origin and a
        peer copy fetched anonymously (else the origin's error stands)."""
        if self.uses_credentials:
            raise exc
        try:
            holders = await self.network.holders(self.key)
        except PeerUnavailableError:
            raise exc from None
        for peer in (p for p in holders if p.complete):
            try:
                manifest = await self.network.manifest(peer, self.key)
            except PeerUnavailableError as why:
                log.info("%s: no listing from peer %s: %s", self.key, peer.node, why)
                continue
            if manifest is None or manifest.get("anonymous") is not True:
                continue
            try:
                files = [
                    RemoteFile(str(e["path"]), int(e["size"]), e.get("sha256"))
                    for e in manifest["files"]
                ]
            except (KeyError, TypeError, ValueError):
                continue
            if files:
                log.warning(
                    "%s: origin unreachable (%s); listing taken from peer %s, whose copy was "
                    "fetched without credentials",
                    self.key,
                    exc,
                    peer.node,
                )
                return files
        raise exc

    # ---- bytes ------------------------------------------------------------------------------

    async def _join(self) -> None:
        if self._joined is None:
            self._joined = asyncio.create_task(self._announce())
        await asyncio.shield(self._joined)

    async def _announce(self) -> None:
        try:
            await self.network.announce(self.key)
            self._announced = True
            holders = await self.network.holders(self.key)
        except PeerUnavailableError as exc:
            log.info("%s: peers unavailable (%s); reading from the origin", self.key, exc)
            return
        if any(p.complete for p in holders) or self.tuning.join_window <= 0:
            return
        # a burst: wait until the set of fetching nodes stops growing (every node must rank
        # the pieces over the same set, or two of them read the same piece), at least
        # join_window seconds, at most three times that
        started = time.monotonic()
        seen = {p.node for p in holders}
        step = self.tuning.join_window / 2
        while time.monotonic() - started < 3 * self.tuning.join_window:
            await asyncio.sleep(step)
            try:
                now = {p.node for p in await self.network.holders(self.key, fresh=True)}
            except PeerUnavailableError:
                return
            if now == seen and time.monotonic() - started >= self.tuning.join_window:
                return
            seen = now

    async def _plan(self, path: str, start: int) -> list[tuple[Peer, float, float, bool]]:
        """The peers to ask for the range at ``start``, each with how long to wait for it
        (when it reads it from the origin), how long to give it to claim it, and whether it
        ranks below this node (then this node claims the piece before asking it).

        Complete peers first (two at most, ranked for this piece so the load spreads),
        then the nodes still fetching in the piece's rendezvous order (the same on every
        node), the owner first: a node ranked above this one gets a grace to claim the
        piece (its engine may be about to: the owner ``grace``, the next ones a quarter of
        it), the others are waited for only if they claimed it already, and this node claims
        the piece before it asks them, so none of them starts reading it meanwhile. Nobody
        has it: this node reads the origin. So for each piece one node reads the origin and
        the others wait for it, whatever order their engines take the pieces in."""
        try:
            holders = await self.network.holders(self.key)
        except PeerUnavailableError:
            return []
        me = self.network.node
        holders = [p for p in holders if p.node != me and p.node not in self._rejected]
        piece = start // self.tuning.piece
        by_node = {p.node: p for p in holders}
        complete = [p.node for p in holders if p.complete]
        plan = [
            (by_node[n], 0.0, 0.0, False) for n in rank_nodes(complete, self.key, path, piece)[:2]
        ]
        fetching = [p.node for p in holders if p.fetching and not p.complete]
        if fetching:
            order = rank_nodes([*fetching, me], self.key, path, piece)
            above = True
            for n in order:
                if n == me:
                    above = False
                    continue
                # the nodes ranked above this one read the piece before it would: the owner
                # gets the full grace to claim it, the next ones a short one (they claim
                # right after the owner's grace ran out); those below never hold it back
                if not above:
                    grace = 0.0
                elif n == order[0]:
                    grace = self.tuning.grace
                else:
                    grace = self.tuning.grace / 4
                plan.append((by_node[n], self.tuning.wait, grace, not above))
        return plan[: self.tuning.max_asked]

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        f = self._listed.get(path)
        if f is None:
            raise SourceError(f"{self.key}: {path} is not in the listing")
        await self._join()
        pos = start
        version = self.version(path)
        release: Callable[[], None] | None = None
        for peer, wait, grace, below in await self._plan(path, start):
            if pos >= end:
                break
            if below and release is None and self._announced:
                # the nodes ranked above had their chance: the piece is this node's now
                release = self.network.claim(self.key, path, pos, end)
            try:
                async for chunk in self.network.read(
                    peer,
                    self.key,
                    f,
                    pos,
                    end,
                    version=version,
                    wait=wait,
                    grace=grace,
                    stall=self.tuning.stall,
                ):
                    pos += len(chunk)
                    self.counts.peers[peer.node] = self.counts.peers.get(peer.node, 0) + len(chunk)
                    if self.meter is not None:
                        self.meter(VIA_PEER, len(chunk))
                    self._contributors.setdefault(path, set()).add(peer.node)
                    yield chunk
            except PeerUnavailableError as exc:
                log.debug("%s: %s [%d, %d) from %s: %s", self.key, path, pos, end, peer.node, exc)
        if pos < end:
            if release is None and self._announced:
                release = self.network.claim(self.key, path, pos, end)
            try:
                async for chunk in self.origin.read_range(path, pos, end):
                    pos += len(chunk)
                    self.counts.origin += len(chunk)
                    yield chunk
            except BaseException:
                if release is not None:
                    release()  # the others must not wait for what this node will not have
                raise

    def reject_file(self, path: str) -> bool:
        """``path`` failed verification: never ask the peers that sent bytes of it again.
        True when some did (a new attempt reads elsewhere); False when every byte came from
        the origin."""
        bad = self._contributors.pop(path, set())
        if not bad:
            return False
        log.warning(
            "%s: %s failed verification with bytes from peer(s) %s; not asking them again",
            self.key,
            path,
            ", ".join(sorted(bad)),
        )
        self._rejected |= bad
        return True

    async def aclose(self) -> None:
        try:
            if self._joined is not None and not self._joined.done():
                self._joined.cancel()
            if self._announced:
                try:
                    await self.network.finish(self.key)
                except PeerUnavailableError as exc:
                    log.info("%s: could not withdraw the fetch announcement: %s", self.key, exc)
        finally:
            await self.origin.aclose()


__all__ = [
    "ByteCounts",
    "Peer",
    "PeerNetwork",
    "PeerSource",
    "PeerTuning",
    "PeerUnavailableError",
    "rank_nodes",
]
