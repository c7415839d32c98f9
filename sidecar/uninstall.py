"""``python -m sidecar uninstall``: remove what modelcache leaves on a node.

Deleting the manifests removes every Kubernetes object, but not the node cache (a hostPath
directory on each node) nor the ``cache.modelcache.io/<cache-key>`` labels the agent put on
the nodes. This command removes both:

* the node cache: every model directory, each removed the way the agent evicts one (its
  ``.model.lock`` taken exclusively without blocking, renamed into ``trash/``, then deleted),
  so a model a running pod still serves is never pulled from under it: it is named, kept, and
  the exit code is 1 (delete those pods, run again). Then ``trash/`` and ``events/``. Other
  files in the directory are not modelcache's and are left alone (and named);
* the labels: one merge-patch per node that sets every ``cache.modelcache.io/*`` label to
  null; other labels are never touched.

``manifests/uninstall`` runs it on every node as a DaemonSet (docs/install.md, "Uninstall").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.cache import NodeCache
from sidecar.journal import EVENTS_DIR
from sidecar.layout import MODELS_DIR, TRASH_DIR, models_root, trash_root

#: What modelcache creates in the node cache directory; nothing else is removed.
OWNED_ENTRIES = (MODELS_DIR, TRASH_DIR, EVENTS_DIR)


@dataclass
class CacheCleanup:
    removed: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def remove_node_cache(cache_dir: Path) -> CacheCleanup:
    """Empty the node cache of every model not in use, then of modelcache's other entries."""
    out = CacheCleanup()
    cache = NodeCache(cache_dir)
    try:
        keys = sorted(p.name for p in models_root(cache_dir).iterdir() if p.is_dir())
    except FileNotFoundError:
        keys = []
    trash = trash_root(cache_dir)
    for key in keys:
        with cache.hold(key, exclusive=True, blocking=False) as idle:
            if not idle:
                out.in_use.append(key)
                continue
            trash.mkdir(parents=True, exist_ok=True)
            target = trash / f"{key}-{secrets.token_hex(4)}"
            os.rename(models_root(cache_dir) / key, target)
        shutil.rmtree(target, ignore_errors=True)
        out.removed.append(key)
    if not out.in_use:
        for name in OWNED_ENTRIES:
            path = Path(cache_dir) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        out.left = sorted(p.name for p in Path(cache_dir).iterdir() if p.name not in OWNED_ENTRIES)
    return out


def cache_label_removal(labels: dict[str, str]) -> dict[str, str | None]:
    """The merge-patch of ``metadata.labels`` that drops every ``cache.modelcache.io/*``."""
    from sidecar.agent import LABEL_PREFIX

    return {k: None for k in sorted(labels) if k.startswith(LABEL_PREFIX)}


async def remove_node_labels(api_client: Any, node: str) -> list[str]:
    """Remove the cache labels of ``node``; return the label keys removed."""
    from sidecar.agent import NodeAPI

    api = NodeAPI(api_client, node)
    patch = cache_label_removal(await api.get_labels())
    if patch:
        await api.patch_labels(patch)
    return list(patch)


async def list_nodes(api_client: Any) -> list[str]:
    from kubernetes.client import CoreV1Api

    nodes = await asyncio.to_thread(CoreV1Api(api_client).list_node, _request_timeout=30)
    return sorted(n.metadata.name for n in nodes.items if n.metadata and n.metadata.name)


def _hold() -> None:
    """Wait for SIGTERM or SIGINT (PID 1 in a container has no default handler for them)."""
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    print("uninstall: holding until SIGTERM", flush=True)
    signal.sigwait(signals)


def run(args: argparse.Namespace) -> int:
    if args.node and args.all_nodes:
        print("uninstall: --node and --all-nodes exclude each other", file=sys.stderr)
        return 2
    if not (args.cache_dir or args.node or args.all_nodes or args.hold):
        print("uninstall: nothing to do: give --cache-dir, --node or --all-nodes", file=sys.stderr)
        return 2
    ok = True
    if args.cache_dir:
        done = remove_node_cache(Path(args.cache_dir))
        print(f"uninstall: removed {len(done.removed)} model(s) from {args.cache_dir}")
        if done.in_use:
            ok = False
            print(
                f"uninstall: {len(done.in_use)} model(s) still in use by running pods, kept: "
                f"{', '.join(done.in_use)}; delete those pods and run again",
                file=sys.stderr,
            )
        if done.left:
            print(f"uninstall: left in {args.cache_dir}, not modelcache's: {', '.join(done.left)}")
    if args.node or args.all_nodes:
        ok = asyncio.run(_labels(args)) and ok
    if args.hold:
        _hold()
    return 0 if ok else 1


async def _labels(args: argparse.Namespace) -> bool:
    from sidecar.agent import NoClusterError, NodeAPIError, load_api_client

    try:
        client = load_api_client()
    except NoClusterError as exc:
        print(f"uninstall: {exc}", file=sys.stderr)
        return False
    try:
        nodes = await list_nodes(client) if args.all_nodes else [args.node]
    except Exception as exc:  # noqa: BLE001 - any API failure is reported, not a traceback
        print(f"uninstall: cannot list nodes: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    ok = True
    for node in nodes:
        try:
            removed = await remove_node_labels(client, node)
        except NodeAPIError as exc:
            print(f"uninstall: {exc}", file=sys.stderr)
            ok = False
            continue
        print(f"uninstall: node {node}: removed {len(removed)} cache.modelcache.io/* label(s)")
    return ok
