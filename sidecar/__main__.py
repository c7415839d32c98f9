"""``python -m sidecar ROLE ...``: the roles of the one cache-client image.

The webhook emits these command lines as exec arrays, so every flag here is part of the
contract between the webhook and the sidecar image. Each role lives in its own module and is
imported only when chosen, so ``probe`` (run by the kubelet every few seconds) stays cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from sidecar.disk import DEFAULT_MAX_BYTES, DEFAULT_MIN_FREE
from sidecar.layout import APP_CACHE_ROOT
from sidecar.node.flags import add_fetch_flags
from sidecar.version import package_version

_DESCRIPTION = """\
The pod and node side of modelcache, one image with several roles:

  warmup     fetch the pod's models into the node cache, then exit (init container)
  mount      serve the models read-only over FUSE (the pod's cache-client sidecar)
  probe      exit 0 when the mount serves the models (startupProbe)
  agent      node agent: node labels, size bound and disk floor, eviction, pre-warm, metrics
  uninstall  remove the node cache and this node's cache.modelcache.io/* labels

Run `python -m sidecar ROLE --help` for the flags of a role. The webhook writes these
command lines into injected pods; you run `agent` (a DaemonSet) and `uninstall` yourself.
"""


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _add_models(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        action="append",
        required=required,
        default=[],
        metavar="NAME=URI",
        help="model to serve or fetch; repeat for several (base model first)",
    )


#: Flags that only the --cache-dir mode uses (dest, flag, value when not given).
_CACHE_ONLY: tuple[tuple[str, str, object], ...] = (
    ("pvc_root", "--pvc-root", "/var/run/modelcache/pvc"),
    ("file_root", "--file-root", []),
    ("serve_cached_when_unreachable", "--serve-cached-when-unreachable", False),
    ("parallel", "--parallel", 8),
    ("warmup", "--warmup", False),
)


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--node-socket",
        metavar="PATH",
        help="node mode (unprivileged): everything comes from the CSI node plugin through "
        "this socket (the FUSE descriptor and the live fetch status); no node cache access",
    )
    where.add_argument(
        "--cache-dir",
        help="the node cache (hostPath; the legacy nodeCache: hostPath setting, privileged)",
    )
    p.add_argument(
        "--include",
        default="",
        metavar="GLOB,GLOB",
        help="fetch only files whose path or name matches one of the globs (default: all); "
        "a warning says when they select no weight files",
    )
    p.add_argument(
        "--pvc-root",
        default=None,
        help="where pvc://CLAIM sources are mounted: <pvc-root>/<CLAIM> "
        "(default /var/run/modelcache/pvc; --cache-dir mode)",
    )
    _add_file_root(p)
    p.add_argument(
        "--serve-cached-when-unreachable",
        action="store_true",
        help="serve a complete cached copy while its source is unreachable even when the pod "
        "sends credentials (then nothing proves the pod may still read the model: a cluster "
        "setting, off by default; anonymous sources are always served from a complete cache; "
        "--cache-dir mode)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="concurrent ranged reads (default 8; --cache-dir mode)",
    )


def _add_file_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--file-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory file:// sources may read (repeat for several); none by default, "
        "so every file:// source is refused",
    )


def check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the --cache-dir mode's flags in node mode; give them their defaults otherwise."""
    if args.role not in ("warmup", "mount"):
        return
    node = args.node_socket is not None
    for dest, flag, default in _CACHE_ONLY:
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        given = value is not None and value is not False and value != []
        if node and given:
            parser.error(
                f"{args.role}: {flag} is for the --cache-dir mode; with --node-socket the node "
                "plugin fetches and serves the models"
            )
        if value is None:
            setattr(args, dest, default)
    if node and args.role == "warmup" and args.include:
        parser.error(
            "warmup: --include is for the --cache-dir mode; with --node-socket the volume's "
            "include attribute tells the node plugin what to fetch"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"modelcache {package_version()}")
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    sub = parser.add_subparsers(dest="role", required=True, metavar="ROLE")

    w = sub.add_parser(
        "warmup",
        help="fetch models into the node cache, then exit",
        description="Fetch every --model into the node cache and exit 0 when all are "
        "complete and verified; with --node-socket (node mode) the CSI node plugin fetches and "
        "this waits, reading its status through the socket about once a second, with no access "
        "to the node cache. Progress goes to the log every few seconds; the final line "
        "(cache hit, bytes downloaded, or what failed and what to do) also goes to the "
        "termination message, which `kubectl describe pod` shows. Exit codes: 0 done (or "
        "failed with --on-failure continue), 1 a model could not be fetched, 2 bad arguments.",
    )
    _add_source_flags(w)
    _add_models(w)
    w.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up")
    w.add_argument(
        "--on-failure",
        choices=("fail", "continue"),
        default="fail",
        help="what a model that cannot be fetched (not found, unauthorized, forbidden, "
        "unreachable, timed out) does to the pod: 'fail' exits 1 and the pod does not start; "
        "'continue' prints the reason and exits 0, so an app that fetches the model itself "
        "starts as it would without modelcache (default: fail)",
    )
    w.add_argument(
        "--termination-log",
        default="/dev/termination-log",
        metavar="PATH",
        help="file for the final message (the kubelet's terminationMessagePath, which it "
        "creates); written only if it exists, an unwritable one is ignored "
        "(default: /dev/termination-log)",
    )

    m = sub.add_parser(
        "mount",
        help="serve models over a read-only FUSE mount",
        description="Serve every --model read-only over FUSE at --mountpoint as "
        "<NAME>/<file>. With --cache-dir (legacy, privileged) the sidecar mounts /dev/fuse "
        "itself and fills the node cache; with --node-socket (node mode, unprivileged) it "
        "receives the FUSE connection the CSI node plugin mounted, serves files the node has "
        "completed as links into --link-root/<cache key>/ (the csi view volume), and lets an "
        "open of a file not complete yet wait until the node has it (EIO if its fetch failed).",
    )
    _add_source_flags(m)
    _add_models(m)
    m.add_argument("--mountpoint", required=True)
    m.add_argument(
        "--link-root",
        default=APP_CACHE_ROOT,
        help="where app containers see <cache-key>/ of each model; complete files are "
        "symlinks there so data reads bypass the FUSE daemon; 'none' serves bytes via FUSE",
    )
    m.add_argument("--warmup", action="store_true", help="also fill the cache in the background")
    m.add_argument(
        "--hub-cache",
        default=None,
        metavar="DIR",
        help="lay out every hf:// model in the Hugging Face cache layout under DIR "
        "(models--ORG--NAME/refs, snapshots/<commit>/<file> linking into the mount)",
    )
    m.add_argument(
        "--hub-link-root",
        default=None,
        metavar="PATH",
        help="where app containers see this mount (the FUSE view): snapshot links point "
        "to PATH/<NAME>/<file> (default: --mountpoint)",
    )
    m.add_argument(
        "--on-failure",
        choices=("fail", "continue"),
        default="fail",
        help="a model whose source cannot be listed: end the mount (fail) or leave it out, "
        "publish .left-out/<NAME> and serve the others (continue)",
    )
    m.add_argument(
        "--gguf-alias",
        action="append",
        default=[],
        metavar="NAME:QUANT",
        help="show <QUANT>.gguf in model NAME's directory, a link to its GGUF file of QUANT",
    )
    m.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds for the background warm-up (--warmup) and for each on-demand fetch; "
        "node mode: for the hand-over and for each open that waits on the node",
    )

    p = sub.add_parser("probe", help="exit 0 when the mount serves the models")
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--model", action="append", default=[], metavar="NAME")
    p.add_argument(
        "--wait", type=float, default=0.0, help="keep trying for this many seconds (postStart)"
    )

    a = sub.add_parser(
        "agent",
        help="node agent: node labels, size bound and disk floor, eviction, pre-warm, metrics",
        description="The node agent (a DaemonSet): labels the node with the models complete "
        "in its cache, evicts least-recently-used models over the size bound or under the "
        "free-space floor (never a model in use), pre-warms configured models and serves "
        "Prometheus metrics. Sizes are bytes (1073741824), with a unit (500Gi, 200G) or a "
        "share of the disk holding the cache (50%%); 0 switches a bound off. Exit codes: 0 "
        "done (--once), 1 the cluster API stayed unreachable, 2 bad arguments.",
    )
    a.add_argument("--cache-dir", required=True, help="the node cache (hostPath)")
    a.add_argument("--node", required=True, help="this node's name (spec.nodeName)")
    a.add_argument(
        "--max-bytes",
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help=f"cache size bound (default {DEFAULT_MAX_BYTES}% of the disk; 0: unbounded)",
    )
    a.add_argument(
        "--min-free",
        default=DEFAULT_MIN_FREE,
        metavar="SIZE",
        help="free space to keep on the disk holding the cache; below it models are evicted "
        f"(default {DEFAULT_MIN_FREE}% of the disk; 0: no floor)",
    )
    a.add_argument(
        "--max-labels",
        type=int,
        default=64,
        help="at most this many cache labels on the node, most recently used models first",
    )
    a.add_argument("--prewarm-config", default=None, help="pre-warm YAML (re-read every pass)")
    a.add_argument(
        "--prewarm-watch",
        action="store_true",
        help="event-driven pre-warm: fetch the models of injected pods bound to this node "
        "before they start, and warm the nodes opted-in workloads scale out to (needs list "
        "access to pods, nodes, deployments, statefulsets, HPAs, leaderworkersets)",
    )
    a.add_argument(
        "--prewarm-watch-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between two reads of the cluster by the pre-warm watcher",
    )
    _add_file_root(a)
    a.add_argument("--interval", type=float, default=30.0, help="seconds between passes")
    a.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: none)"
    )
    a.add_argument("--once", action="store_true", help="one pass, then exit")
    add_fetch_flags(a)

    u = sub.add_parser(
        "uninstall",
        help="remove the node cache and this node's cache.modelcache.io/* labels",
        description="Remove what modelcache leaves on a node: the models in the node cache "
        "(never one a running pod still serves: those are listed and the exit code is 1) and "
        "the node's cache.modelcache.io/* labels. Run it on each node (manifests/uninstall "
        "does that as a DaemonSet) after deleting the webhook and the agent. Exit codes: 0 "
        "clean, 1 something is left (named in the output), 2 bad arguments.",
    )
    u.add_argument("--cache-dir", help="the node cache to empty (hostPath)")
    u.add_argument(
        "--node", help="remove the cache.modelcache.io/* labels of this node (needs a cluster)"
    )
    u.add_argument(
        "--all-nodes",
        action="store_true",
        help="remove the cache.modelcache.io/* labels of every node (kubeconfig with list "
        "and patch on nodes)",
    )
    u.add_argument(
        "--hold",
        action="store_true",
        help="after cleaning, stay running until SIGTERM (so a DaemonSet shows every node "
        "done with `kubectl rollout status`)",
    )

    from sidecar.node.flags import add_parser as add_csi_parser

    add_csi_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_mode(parser, args)
    _setup_logging(args.log_level, args.log_json)
    if args.role == "warmup":
        from sidecar import warmup

        return warmup.run_node(args) if args.node_socket else warmup.run(args)
    if args.role == "mount":
        from sidecar import mount

        return mount.run(args)
    if args.role == "probe":
        from sidecar import probe

        return probe.run(args)
    if args.role == "uninstall":
        from sidecar import uninstall

        return uninstall.run(args)
    if args.role == "csi":
        from sidecar.node import csi

        return csi.run(args)
    from sidecar import agent

    return agent.run(args)


if __name__ == "__main__":
    sys.exit(main())
