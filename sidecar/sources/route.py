"""Where the node side reads a model's bytes from: the origin, or the origin through peers.

:func:`wrap_source` is the one place the node side (the CSI node plugin's fill, the agent's
pre-warm) turns an origin :class:`~sidecar.sources.Source` into the source it fetches
through, according to the node's :class:`FetchSettings`. A small typed dispatch: each
backend is a branch that wraps the origin and keeps it as the authority for the listing.
The pod side (warm-up, mount) never routes: it reads only the node cache or the origin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final, cast

from sidecar.modelsource import ModelSourceError, parse_model_uri
from sidecar.sources import Source
from sidecar.sources.peer import PeerNetwork, PeerSource, PeerTuning

#: Schemes worth reading from peers: remote origins. ``file://`` and ``pvc://`` are local
#: disks (copied in the kernel), faster than any peer.
PEER_SCHEMES: Final = frozenset({"http", "https", "s3", "gs", "hf"})


#: ``(via, bytes)``: bytes a source got from elsewhere than the origin (``peer``,
#: ``dragonfly``), for the agent's ``modelcache_fetch_bytes`` counter.
Meter = Callable[[str, int], None]


@dataclass(frozen=True)
class FetchSettings:
    """The node's fetch settings (agent and node plugin flags)."""

    #: the other node agents (``sidecar.node.peers``); None: peers off
    peers: PeerNetwork | None = None
    peer_tuning: PeerTuning = field(default_factory=PeerTuning)
    #: the node's Dragonfly daemon socket (``sidecar.sources.dragonfly``); None: off
    dragonfly_socket: str | None = None
    meter: Meter | None = None


def wrap_source(origin: Source, uri: str, settings: FetchSettings | None) -> Source:
    """The source the node fetches ``uri`` through; ``origin`` itself when nothing applies.

    The node's Dragonfly daemon when one is configured and the origin can name URLs (the
    daemon then does the sharing between nodes), else the other agents for remote origins.
    """
    if settings is None:
        return origin
    try:
        source = parse_model_uri(uri)
    except ModelSourceError:
        return origin  # not ours to judge here: the origin reports a bad URI itself
    if settings.dragonfly_socket:
        from sidecar.sources import dragonfly

        # the daemon's settings protocol reads only dragonfly_socket (frozen here)
        daemon = cast("dragonfly.DragonflySettings", settings)
        wrapped = dragonfly.wrap(origin, uri, daemon, meter=settings.meter)
        if wrapped is not origin:
            return wrapped
    if settings.peers is not None and source.scheme in PEER_SCHEMES:
        return PeerSource(
            origin, source.cache_key, settings.peers, settings.peer_tuning, meter=settings.meter
        )
    return origin


def source_wrapper(settings: FetchSettings | None) -> Callable[[Source, str], Source] | None:
    """``wrap_source`` bound to ``settings``, for ``warm_models(wrap=...)``; None when the
    node has no fetch settings (every byte from the origin)."""
    return None if settings is None else partial(wrap_source, settings=settings)


__all__ = ["PEER_SCHEMES", "FetchSettings", "Meter", "source_wrapper", "wrap_source"]
