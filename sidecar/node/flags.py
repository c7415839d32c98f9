"""The flags of ``python -m sidecar csi``, and the fetch flags it shares with the agent;
standard library only, so building the command line of the other roles (``probe`` runs every
few seconds) never loads gRPC."""

from __future__ import annotations

import os
from typing import Any

DRIVER_NAME = "csi.modelcache.io"


def add_fetch_flags(p: Any) -> None:
    """How the node fetches models besides the origin: the node's Dragonfly daemon and the
    other nodes' caches (docs/scale-out.md). Both node roles take them (``agent``, ``csi``);
    in one pod only one of them gives ``--peer-listen`` (one peer server per node)."""
    p.add_argument(
        "--dragonfly-socket",
        default=None,
        metavar="PATH",
        help="the node's Dragonfly daemon (dfdaemon) unix socket: model bytes go through it, "
        "with the origin as fallback",
    )
    p.add_argument(
        "--peer-listen",
        default=None,
        metavar="IP:PORT",
        help="serve this node's cache to the other nodes (HTTPS, mutual TLS) on IP:PORT and "
        "publish the address in the node annotation modelcache.io/peer; one process per node "
        "(default: no peer server; docs/scale-out.md)",
    )
    p.add_argument(
        "--peer-advertise",
        default=None,
        metavar="IP",
        help="the address other nodes reach this one at (the pod's IP); needed when "
        "--peer-listen names every address (0.0.0.0 or [::])",
    )
    p.add_argument(
        "--peer-tls-dir",
        default=None,
        metavar="DIR",
        help="ca.crt (the agents' CA) and this node's tls.crt/tls.key, or ca.key to issue "
        "them at start: turns on fetching from peers (with or without --peer-listen)",
    )


def check_fetch_flags(args: Any) -> None:
    """ValueError naming the flag when the fetch flags cannot work together."""
    dragonfly_socket = getattr(args, "dragonfly_socket", None)
    if dragonfly_socket and not os.path.isabs(dragonfly_socket):
        raise ValueError(f"--dragonfly-socket {dragonfly_socket}: must be an absolute path")
    if getattr(args, "peer_listen", None) and not getattr(args, "peer_tls_dir", None):
        raise ValueError("--peer-listen needs --peer-tls-dir (the agents' CA and certificate)")


def add_parser(sub: Any) -> None:
    """The ``csi`` subcommand's flags (called from ``sidecar.__main__``)."""
    c = sub.add_parser("csi", help=f"the {DRIVER_NAME} CSI node plugin (gRPC on a unix socket)")
    c.add_argument(
        "--csi-endpoint",
        default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"),
        help="unix:///path of the gRPC socket (env CSI_ENDPOINT)",
    )
    c.add_argument(
        "--node-id",
        default=os.environ.get("NODE_NAME", ""),
        help="this node's name, returned by NodeGetInfo (env NODE_NAME)",
    )
    c.add_argument("--cache-dir", required=True, help="the node cache")
    c.add_argument(
        "--kubelet-root", default="/var/lib/kubelet", help="the kubelet's root directory"
    )
    c.add_argument(
        "--file-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory file:// sources may name (repeat; none: file:// is refused)",
    )
    c.add_argument(
        "--check-timeout",
        type=float,
        default=30.0,
        help="seconds for the access check of one model at publish",
    )
    c.add_argument(
        "--fetch-timeout", type=float, default=3600.0, help="seconds for one model's fetch"
    )
    c.add_argument("--parallel", type=int, default=8, help="concurrent ranged reads per fetch")
    c.add_argument(
        "--fetch-retry",
        type=float,
        default=10.0,
        help="seconds after a failed fetch before a status poll of one of its pods starts it "
        "again (doubling per failure, at most 300)",
    )
    add_fetch_flags(c)
