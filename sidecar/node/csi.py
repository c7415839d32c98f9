"""``python -m sidecar csi``: the gRPC face of the ``csi.modelcache.io`` node plugin.

A thin servicer: the Identity service, and the Node service's publish, unpublish,
capabilities and node info, on a unix socket that node-driver-registrar registers with the
kubelet. Requests become :class:`sidecar.node.publish.PublishRequest`; errors come back as
gRPC status codes the kubelet understands:

=====================  ========================  =========================================
``ErrorKind``          gRPC code                 what the kubelet does
=====================  ========================  =========================================
PENDING                ABORTED                   retries (operation in progress)
UNAVAILABLE            UNAVAILABLE               retries
DENIED                 PERMISSION_DENIED         reports it on the pod, retries with backoff
INVALID                INVALID_ARGUMENT          reports it on the pod, retries with backoff
CONFLICT               ALREADY_EXISTS            reports it on the pod
SOURCE                 FAILED_PRECONDITION       reports it on the pod, retries with backoff
INTERNAL               INTERNAL                  reports it on the pod, retries with backoff
=====================  ========================  =========================================

No staging, no volume stats, no expansion: NodeGetCapabilities advertises none, so the
kubelet calls only NodePublishVolume and NodeUnpublishVolume.

With the fetch flags it shares with the agent (``sidecar.node.flags.add_fetch_flags``) the
fills of pods' publishes read through the node's Dragonfly daemon or the other nodes' caches
(``sidecar.sources.route.source_wrapper``); the access check at publish stays with the
origin and the pod's own credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf import wrappers_pb2

from sidecar.node import _csi_pb2 as pb
from sidecar.node import _csi_pb2_grpc as pb_grpc
from sidecar.node.flags import DRIVER_NAME, check_fetch_flags
from sidecar.node.publish import (
    ErrorKind,
    PluginConfig,
    Publisher,
    PublishError,
    PublishRequest,
)
from sidecar.sources.route import FetchSettings

log = logging.getLogger(__name__)

STATUS: Final = {
    ErrorKind.PENDING: grpc.StatusCode.ABORTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.SOURCE: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def _version() -> str:
    try:
        return metadata.version("modelcache")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class IdentityServicer(pb_grpc.IdentityServicer):  # type: ignore[misc]
    async def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=_version())

    async def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        return pb.GetPluginCapabilitiesResponse()  # a node plugin only: no controller

    async def Probe(self, request: Any, context: Any) -> Any:
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))


class NodeServicer(pb_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(self, publisher: Publisher, node_id: str) -> None:
        self.publisher = publisher
        self.node_id = node_id

    async def _call(self, what: str, context: Any, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except PublishError as exc:
            log.info("%s: %s: %s", what, exc.kind.value, exc)
            await context.abort(STATUS[exc.kind], str(exc))

    async def NodePublishVolume(self, request: Any, context: Any) -> Any:
        cap = request.volume_capability
        if cap.WhichOneof("access_type") == "block":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{DRIVER_NAME} volumes are directories: block access is not supported",
            )
        req = PublishRequest(
            volume_id=request.volume_id,
            target_path=request.target_path,
            volume_context=dict(request.volume_context),
            secrets=dict(request.secrets),
            readonly=request.readonly,
        )
        await self._call(
            f"publish {request.volume_id}", context, lambda: self.publisher.publish(req)
        )
        return pb.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:
        await self._call(
            f"unpublish {request.volume_id}",
            context,
            lambda: self.publisher.unpublish(request.volume_id, request.target_path),
        )
        return pb.NodeUnpublishVolumeResponse()

    async def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        return pb.NodeGetCapabilitiesResponse()

    async def NodeGetInfo(self, request: Any, context: Any) -> Any:
        return pb.NodeGetInfoResponse(node_id=self.node_id)


def socket_path(endpoint: str) -> Path:
    """``unix:///abs/path`` (or a bare absolute path) → the path; anything else is refused."""
    path = endpoint.removeprefix("unix://")
    if not path.startswith("/"):
        raise ValueError(f"--csi-endpoint {endpoint!r}: expected unix:///absolute/path")
    return Path(path)


async def start_server(endpoint: str, publisher: Publisher, node_id: str) -> Any:
    """Serve the Identity and Node services on ``endpoint``; returns the started server."""
    path = socket_path(endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a previous run: the kubelet reconnects to the new one
    server = grpc.aio.server()
    pb_grpc.add_IdentityServicer_to_server(IdentityServicer(), server)
    pb_grpc.add_NodeServicer_to_server(NodeServicer(publisher, node_id), server)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    os.chmod(path, 0o600)
    log.info("%s node plugin for node %s listening on unix://%s", DRIVER_NAME, node_id, path)
    return server


@dataclass(frozen=True)
class FetchFlags:
    """The fetch flags (``--dragonfly-socket``, ``--peer-*``) as given."""

    dragonfly_socket: str | None = None
    peer_listen: str | None = None
    peer_advertise: str | None = None
    peer_tls_dir: Path | None = None


async def _start_fetch(
    flags: FetchFlags, config: PluginConfig, node_id: str
) -> tuple[FetchSettings | None, Any]:
    """The fills' fetch settings and the peer service (None when peers are off); the peer
    server too with ``--peer-listen``. PeerSetupError (a ValueError) when they cannot
    start."""
    if flags.peer_tls_dir is None:
        if flags.dragonfly_socket is None:
            return None, None
        return FetchSettings(dragonfly_socket=flags.dragonfly_socket), None
    from sidecar.agent import NoClusterError, load_api_client
    from sidecar.node.peers import PeerSetupError, PeerTLS, start_peers

    listen = flags.peer_listen
    address = flags.peer_advertise or (listen.rpartition(":")[0].strip("[]") if listen else "")
    tls = PeerTLS.from_dir(flags.peer_tls_dir, node=node_id, ips=[address] if address else [])
    try:
        api_client = load_api_client()
    except NoClusterError as exc:
        raise PeerSetupError(
            f"--peer-tls-dir: nodes find their peers through the Kubernetes API: {exc}"
        ) from None
    peers = await start_peers(
        api_client,
        node=node_id,
        cache_dir=config.cache_dir,
        tls=tls,
        listen=listen,
        advertise=flags.peer_advertise,
    )
    settings = FetchSettings(peers=peers.network, dragonfly_socket=flags.dragonfly_socket)
    return settings, peers


async def serve(
    endpoint: str, config: PluginConfig, node_id: str, flags: FetchFlags | None = None
) -> int:
    """Run until SIGTERM or SIGINT, then stop accepting calls and finish running ones."""
    loop = asyncio.get_running_loop()
    # downloads write through threads (plus hashing and fdatasync): more than cores + 4
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=config.parallel + 8, thread_name_prefix="node-io")
    )
    flags = flags or FetchFlags()
    try:
        fetch, peers = await _start_fetch(flags, config, node_id)
    except ValueError as exc:  # PeerSetupError
        log.error("%s", exc)
        return 2
    publisher = Publisher(replace(config, fetch=fetch))
    try:
        server = await start_server(endpoint, publisher, node_id)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping the node plugin")
        await server.stop(grace=10)
    finally:
        await publisher.aclose()
        if peers is not None:
            await peers.aclose()
        if flags.dragonfly_socket:
            from sidecar.sources import dragonfly

            await dragonfly.daemon_client(flags.dragonfly_socket).aclose()
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.node_id:
        log.error("--node-id (or env NODE_NAME) is required")
        return 2
    try:
        socket_path(args.csi_endpoint)
        check_fetch_flags(args)
        if args.peer_listen:
            from sidecar.node.peers import parse_listen

            parse_listen(args.peer_listen)  # PeerSetupError (a ValueError) naming the flag
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if (
        args.parallel < 1
        or args.check_timeout <= 0
        or args.fetch_timeout <= 0
        or args.fetch_retry <= 0
    ):
        log.error("--parallel must be >= 1, --check-timeout, --fetch-timeout and --fetch-retry > 0")
        return 2
    config = PluginConfig(
        cache_dir=Path(args.cache_dir),
        kubelet_root=Path(args.kubelet_root),
        file_roots=tuple(Path(r) for r in args.file_root),
        check_timeout=args.check_timeout,
        fetch_timeout=args.fetch_timeout,
        parallel=args.parallel,
        fetch_retry=args.fetch_retry,
    )
    flags = FetchFlags(
        dragonfly_socket=args.dragonfly_socket or None,
        peer_listen=args.peer_listen or None,
        peer_advertise=args.peer_advertise or None,
        peer_tls_dir=Path(args.peer_tls_dir) if args.peer_tls_dir else None,
    )
    return asyncio.run(serve(args.csi_endpoint, config, args.node_id, flags))
