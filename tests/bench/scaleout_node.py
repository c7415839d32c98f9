"""One node of ``tests.bench.bench_scaleout``, run inside its network namespace.

It is what the node side runs on a real node, in one process: the agent's peer service
(``sidecar.node.peers.start_peers``: the mutual-TLS peer server on the node's address, its
``modelcache.io/peer`` annotation, the peer network over the Kubernetes API stand-in) and the
CSI node plugin's publisher (``sidecar.node.publish.Publisher``) whose access check starts
the model's fill, exactly as a pod's NodePublishVolume does. Orders come on stdin, one per
line; answers go to stdout as one JSON object per line:

* ``go peers`` / ``go origin``: publish's access check for a pod of the model (it starts the
  fill), wait for the fill, check again that the model is complete and current; answers
  ``{"ok": true, "elapsed": seconds}`` or ``{"ok": false, "error": ...}``;
* ``reset``: empty the node cache; answers ``{"ok": true}``;
* ``exit`` (or end of input): stop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from sidecar.cache import NodeCache
from sidecar.modelsource import parse_model_arg
from sidecar.node.peers import PeerTLS, start_peers
from sidecar.node.publish import PluginConfig, PodInfo, Publisher, VolumeSpec
from sidecar.sources.route import FetchSettings


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _fill(publisher: Publisher, spec: VolumeSpec, limit: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            await publisher._check_models(spec, {})  # starts the fill, as a publish does
            tasks = [f.task for f in publisher._fetches.values() if f.task is not None]
            await asyncio.gather(*tasks)
            failed = [f.error for f in publisher._fetches.values() if f.error]
            if failed:
                return {"ok": False, "error": "; ".join(failed)}
            listings = await publisher._check_models(spec, {})
    except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, which fails the run
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    elapsed = time.monotonic() - started
    if not all(listing.current for listing in listings.values()):
        return {"ok": False, "error": "not complete after the fill"}
    return {"ok": True, "elapsed": elapsed}


async def main(args: argparse.Namespace) -> int:
    conf = k8s.Configuration(host=args.api)
    conf.retries = False
    api = k8s.ApiClient(conf)
    cache_dir = Path(args.cache_dir)
    tls = PeerTLS.from_dir(Path(args.tls_dir), node=args.node, ips=[args.ip])
    service = await start_peers(
        api, node=args.node, cache_dir=cache_dir, tls=tls, listen=f"{args.ip}:{args.port}"
    )
    model = parse_model_arg(f"llm={args.model}")
    spec = VolumeSpec("view", (model,), PodInfo(f"pod-{args.node}", "bench"))
    _say({"ok": True, "peer": service.server.url if service.server else ""})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line in ("", "exit"):
                return 0
            if line == "reset":
                shutil.rmtree(cache_dir / "models", ignore_errors=True)
                _say({"ok": True})
                continue
            if line.startswith("go "):
                fetch = FetchSettings(peers=service.network) if line == "go peers" else None
                publisher = Publisher(
                    PluginConfig(cache_dir=cache_dir, parallel=args.parallel, fetch=fetch),
                    cache=NodeCache(cache_dir, part_size=args.part_size),
                    node_env={},
                )
                _say(await _fill(publisher, spec, args.timeout))
                await publisher.aclose()
                continue
            _say({"ok": False, "error": f"unknown order {line!r}"})
    finally:
        await service.aclose()
        api.close()


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--node", required=True)
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, default=9443)
    p.add_argument("--api", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--tls-dir", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--part-size", type=int, required=True)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--timeout", type=float, default=240.0)
    return asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    sys.exit(run())
