"""The flags of ``python -m sidecar csi``; standard library only, so building the command
line of the other roles (``probe`` runs every few seconds) never loads gRPC."""

from __future__ import annotations

import os
from typing import Any

DRIVER_NAME = "csi.modelcache.io"


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
