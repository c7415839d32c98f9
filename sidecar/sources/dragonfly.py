"""Bytes through the node's Dragonfly daemon: P2P at piece level for large fleets.

When the cluster runs Dragonfly (a ``dfdaemon`` on every node, a scheduler, seed peers), the
node agent can hand each ranged read of a model file to its node's daemon instead of asking
the origin itself: the daemon gets the pieces from other daemons that already have them and
goes back to the source only for pieces nobody has, so a burst of cold nodes costs the origin
about one copy of the model.

:class:`DragonflySource` wraps the model's own source (the *origin*):

* the listing always comes from the origin, with the caller's credentials: it is the access
  check and the truth every byte is verified against (size, sha256 where the origin gives
  one: the fetch engine checks it, whatever path the bytes took);
* ``read_range`` calls ``dfdaemon.v2.DfdaemonDownload/DownloadTask`` on the daemon's unix
  socket (the protocol of the ``dragonfly-api`` package: a ``Download`` with the file's URL,
  the headers the origin needs, the byte range, and ``need_piece_content`` so the pieces
  come back in the stream) and yields the range in order from the pieces it receives (they
  may arrive out of order; offsets are positions in the file, trimmed to the range);
* a file whose bytes from the daemon fail the engine's sha256 check is read from the origin
  from then on (``reject_file``, which the engine calls before fetching it again);
* **any** daemon failure (socket missing, refused, an RPC error, a stall longer than
  ``read_timeout``, a piece that does not fit, a stream that ends early) falls back to the
  origin for the bytes not yet yielded, and the daemon is left alone for ``cooldown`` seconds
  so a dead daemon costs one failed call, not one per part.

Only origins that can name a URL for a file (``download_target``: http(s) and hf://) go
through the daemon; :func:`wrap` returns any other source unchanged. Bytes are reported to
``meter(via, n)`` as ``dragonfly`` or ``origin`` (the ``modelcache_fetch_bytes_total``
counter of the agent, label ``via``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from sidecar.sources import OriginWrapper, RemoteFile, Source

log = logging.getLogger(__name__)

#: ``via`` label values this module reports.
VIA_DRAGONFLY: Final = "dragonfly"
VIA_ORIGIN: Final = "origin"
#: The gRPC method the daemon serves on its unix socket (dfdaemon v2, download service).
DOWNLOAD_METHOD: Final = "/dfdaemon.v2.DfdaemonDownload/DownloadTask"
#: ``Download.application``: how the daemon's metrics and tasks name us.
APPLICATION: Final = "modelcache"
DEFAULT_COOLDOWN: Final = 30.0

Meter = Callable[[str, int], None]


class DragonflyError(Exception):
    """The daemon could not deliver the range; the caller falls back to the origin."""


class _Targeted(Protocol):
    def download_target(self, path: str) -> tuple[str, dict[str, str]]: ...


class DragonflySettings(Protocol):
    """What :func:`wrap` reads from the node's settings (agent or CSI plugin)."""

    dragonfly_socket: str | None


def _no_meter(via: str, n: int) -> None:
    return None


class DaemonClient:
    """One gRPC channel to the daemon's unix socket, created on first use (on the running
    loop) and shared by every source of the process; remembers when the daemon last failed."""

    def __init__(self, socket_path: Path | str, *, cooldown: float = DEFAULT_COOLDOWN) -> None:
        self.socket_path = str(socket_path)
        self.cooldown = cooldown
        self._channel: Any = None
        self._stub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down_until = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def mark_down(self, why: str) -> None:
        if self.available():
            log.warning(
                "dragonfly daemon at %s failed (%s); fetching from the origin for %.0fs",
                self.socket_path,
                why,
                self.cooldown,
            )
        self._down_until = time.monotonic() + self.cooldown

    def _stream(self, request: Any, timeout: float | None) -> Any:
        import grpc
        from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            # a grpc.aio channel belongs to the loop it was made on
            self._loop = loop
            # no proxy for a unix socket, and pieces up to the daemon's piece length (4 MiB
            # by default, up to 64 MiB) must fit in one message
            self._channel = grpc.aio.insecure_channel(
                f"unix://{self.socket_path}",
                options=[
                    ("grpc.max_receive_message_length", 256 << 20),
                    ("grpc.enable_http_proxy", 0),
                ],
            )
            self._stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(self._channel)
        assert isinstance(request, dfdaemon_pb2.DownloadTaskRequest)
        return self._stub.DownloadTask(request, timeout=timeout)

    async def download(
        self,
        url: str,
        headers: Mapping[str, str],
        start: int,
        end: int,
        *,
        read_timeout: float,
        digest: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of ``url`` in order, or :class:`DragonflyError`."""
        import grpc
        from dragonfly_api import common_pb2, dfdaemon_pb2

        download = common_pb2.Download(
            url=url,
            range=common_pb2.Range(start=start, length=end - start),
            type=common_pb2.TaskType.STANDARD,
            priority=common_pb2.Priority.LEVEL0,
            request_header=dict(headers),
            need_piece_content=True,
            application=APPLICATION,
        )
        if digest:
            download.digest = f"sha256:{digest}"
        call = self._stream(dfdaemon_pb2.DownloadTaskRequest(download=download), None)
        pending: dict[int, bytes] = {}  # out-of-order pieces, by their first byte
        pos = start
        stream = call.__aiter__()
        try:
            while pos < end:
                try:
                    response = await asyncio.wait_for(stream.__anext__(), read_timeout)
                except StopAsyncIteration:
                    raise DragonflyError(
                        f"stream ended at byte {pos} of range {start}-{end - 1}"
                    ) from None
                except TimeoutError:
                    raise DragonflyError(f"no piece for {read_timeout:g}s") from None
                if not response.HasField("download_piece_finished_response"):
                    continue  # the started response: nothing to yield yet
                piece = response.download_piece_finished_response.piece
                data = piece.content
                if piece.length and len(data) != piece.length:
                    raise DragonflyError(
                        f"piece {piece.number} has {len(data)} bytes, says {piece.length}"
                    )
                first, last = max(piece.offset, start), min(piece.offset + len(data), end)
                if first >= last:
                    raise DragonflyError(
                        f"piece {piece.number} at {piece.offset}+{len(data)} is outside the "
                        f"range {start}-{end - 1}"
                    )
                pending[first] = data[first - piece.offset : last - piece.offset]
                while pos in pending:
                    chunk = pending.pop(pos)
                    pos += len(chunk)
                    yield chunk
        except grpc.aio.AioRpcError as exc:
            raise DragonflyError(f"{exc.code().name}: {exc.details()}") from None
        except grpc.RpcError as exc:
            raise DragonflyError(f"RPC error: {exc}") from None
        finally:
            call.cancel()

    async def aclose(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            with contextlib.suppress(Exception):
                await channel.close()


class DragonflySource(OriginWrapper):
    """``origin`` with its bytes fetched through the node's Dragonfly daemon (see the module
    docstring); a :class:`~sidecar.sources.Source`."""

    def __init__(
        self,
        origin: Source,
        daemon: DaemonClient,
        *,
        meter: Meter | None = None,
        read_timeout: float = 60.0,
    ) -> None:
        self.origin = origin
        self.daemon = daemon
        self.meter = meter or _no_meter
        self.read_timeout = read_timeout
        self._sha256: dict[str, str | None] = {}
        self._direct: set[str] = set()  # files whose daemon bytes failed verification

    async def list_files(self) -> list[RemoteFile]:
        files = await self.origin.list_files()
        self._sha256 = {f.path: f.sha256 for f in files}
        return files

    def reject_file(self, path: str) -> bool:
        """The file failed its sha256 check: read it from the origin from now on. True when
        that is a different place than before (the fetch engine then fetches it again)."""
        if path in self._direct:
            return False
        self._direct.add(path)
        log.warning("%s: bytes from the dragonfly daemon failed verification; origin next", path)
        return True

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        pos = start
        if self.daemon.available() and path not in self._direct:
            target: _Targeted = self.origin  # type: ignore[assignment]
            url, headers = target.download_target(path)
            try:
                async for chunk in self.daemon.download(
                    url,
                    headers,
                    start,
                    end,
                    read_timeout=self.read_timeout,
                    digest=self._sha256.get(path),
                ):
                    pos += len(chunk)
                    self.meter(VIA_DRAGONFLY, len(chunk))
                    yield chunk
                return
            except DragonflyError as exc:
                self.daemon.mark_down(f"{path} bytes {pos}-{end - 1}: {exc}")
        async for chunk in self.origin.read_range(path, pos, end):
            self.meter(VIA_ORIGIN, len(chunk))
            yield chunk

    async def aclose(self) -> None:
        await self.origin.aclose()


_clients: dict[str, DaemonClient] = {}


def daemon_client(socket_path: Path | str) -> DaemonClient:
    """The process's one client of the daemon at ``socket_path`` (its failure memory is
    shared by every model fetched at the same time)."""
    key = str(socket_path)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = DaemonClient(key)
    return client


def supports(origin: Source) -> bool:
    """Whether the daemon can fetch this origin's files back-to-source (it names URLs)."""
    return callable(getattr(origin, "download_target", None))


def wrap(
    origin: Source,
    uri: str,
    settings: DragonflySettings,
    *,
    meter: Meter | None = None,
    read_timeout: float = 60.0,
) -> Source:
    """``origin`` through the node's daemon when ``settings.dragonfly_socket`` names one and
    the origin can name URLs; otherwise ``origin`` itself. For the route module."""
    socket_path = getattr(settings, "dragonfly_socket", None)
    if not socket_path or not supports(origin):
        return origin
    log.debug("%s: bytes through the dragonfly daemon at %s", uri, socket_path)
    return DragonflySource(
        origin,
        daemon_client(socket_path),
        meter=meter or getattr(settings, "meter", None),
        read_timeout=read_timeout,
    )


__all__ = [
    "DOWNLOAD_METHOD",
    "VIA_DRAGONFLY",
    "VIA_ORIGIN",
    "DaemonClient",
    "DragonflyError",
    "DragonflySettings",
    "DragonflySource",
    "daemon_client",
    "supports",
    "wrap",
]
