"""The TLS listener in front of aiohttp: bounded connections and read deadlines.

aiohttp has an idle (keep-alive) timeout but no deadline for the TLS handshake it does not
see, for a request whose headers trickle in, nor a bound on open connections; asyncio's own
server accepts every connection and gives a handshake 60 s. One client holding a thousand
half-sent requests would hold a thousand connections (each with its TLS state) for as long
as it likes. ``Listener`` is the small front that closes those holes:

- its own accept loop stops accepting at ``max_connections`` (the kernel's accept queue
  holds the rest) and resumes when a connection closes;
- the TLS handshake must finish within the header timeout;
- each connection is wrapped by ``_Connection``, which gives every request
  ``header_timeout`` from its first byte (or from connect, for the first request) until the
  app sees it, and closes a connection idle longer than ``idle_timeout`` between requests;
  the body deadline is the handler's (it reads the body, ``handlers._read_body``);
- a connection past a deadline is aborted (no TLS close exchange a slow peer could stall).

Memory goes back to the system after a wave of connections: freed TLS state sits in the C
heap, which glibc returns only from its top, so after many closes the listener asks glibc to
release free pages (``malloc_trim``) once things calm down.

The per-connection TLS read buffer is 32 KiB instead of asyncio's 256 KiB: asyncio
allocates (and zero-fills) it when the connection is accepted, which made 1,000 slow
connections cost ~290 MB; TLS records are at most 16 KiB, so a larger buffer only saves a
few system calls on multi-megabyte bodies (measured in docs/bench-admission.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import enum
import logging
import socket
import ssl
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger(__name__)

#: Seconds a closing TLS connection waits for the peer's close_notify.
TLS_SHUTDOWN_SECONDS = 1.0
#: Bytes of the per-connection TLS read buffer (asyncio's default is 256 KiB).
TLS_READ_BUFFER = 32 * 1024
_ACCEPT_BACKLOG = 1024
_ACCEPT_ERROR_PAUSE = 0.1  # e.g. EMFILE: let connections close before accepting again
#: Closes after which freed memory is handed back, and how often that is checked (seconds).
TRIM_AFTER_CLOSES = 64
TRIM_INTERVAL = 2.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_MALLOC_TRIM = _load_malloc_trim()


@dataclass(frozen=True)
class Limits:
    """Read deadlines and the connection bound (``Config`` carries the defaults)."""

    header_timeout: float
    idle_timeout: float
    max_connections: int


#: Why the listener closed a connection (the label of the ``connections_closed`` metric).
CloseReason = str
HEADER_TIMEOUT: CloseReason = "header_timeout"
IDLE_TIMEOUT: CloseReason = "idle_timeout"
HANDSHAKE_FAILED: CloseReason = "handshake"


class _Phase(enum.Enum):
    HEADERS = "headers"  # waiting for a request line and headers, deadline running
    BUSY = "busy"  # the app has the request; the handler owns its deadlines
    IDLE = "idle"  # between requests on a kept-alive connection
    DRAIN = "drain"  # answered without reading the whole body: aiohttp lingers, then closes


class _SmallBufferTLS(sslproto.SSLProtocol):
    """asyncio's TLS protocol with a smaller read buffer (see the module docstring)."""

    max_size = TLS_READ_BUFFER


class _Connection(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol and enforces the header and idle deadlines.

    The app tells it when a request starts and ends (``request_started`` /
    ``request_finished``, called by the server's middleware); bytes arriving between two
    requests start the next request's header deadline.
    """

    def __init__(self, inner: asyncio.Protocol, listener: Listener) -> None:
        self._inner = inner
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._phase = _Phase.HEADERS
        self._body_done = False
        self._early_bytes_at: float | None = None  # next request began while BUSY

    # --- asyncio.Protocol, forwarded ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._listener.opened(self)
        self._arm(self._listener.limits.header_timeout, HEADER_TIMEOUT)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._phase is _Phase.IDLE:
            self._phase = _Phase.HEADERS
            self._arm(self._listener.limits.header_timeout, HEADER_TIMEOUT)
        elif self._phase is _Phase.BUSY and self._body_done and self._early_bytes_at is None:
            self._early_bytes_at = asyncio.get_running_loop().time()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None
        self._listener.closed(self)
        self._inner.connection_lost(exc)

    @property
    def busy(self) -> bool:
        return self._phase is _Phase.BUSY

    # --- request boundaries, from the app -------------------------------------------------
    def request_started(self, has_body: bool) -> None:
        self._cancel_timer()
        self._phase = _Phase.BUSY
        self._body_done = not has_body
        self._early_bytes_at = None

    def body_read(self) -> None:
        self._body_done = True

    def request_finished(self) -> None:
        if self._transport is None:
            return
        if not self._body_done:
            # The rest of the body is being read and dropped (aiohttp's linger) and the
            # connection closed after it; this timer is only the backstop.
            self._phase = _Phase.DRAIN
            self._arm(self._listener.limits.header_timeout, None)
        elif self._early_bytes_at is not None:
            # A pipelined request began while this one ran: its headers are already due.
            self._phase = _Phase.HEADERS
            spent = asyncio.get_running_loop().time() - self._early_bytes_at
            self._arm(max(0.0, self._listener.limits.header_timeout - spent), HEADER_TIMEOUT)
        else:
            self._phase = _Phase.IDLE
            self._arm(self._listener.limits.idle_timeout, IDLE_TIMEOUT)

    # --- deadlines ------------------------------------------------------------------------
    def _arm(self, seconds: float, reason: CloseReason | None) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._expire, reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, reason: CloseReason | None) -> None:
        self._timer = None
        if self._transport is None or self._phase is _Phase.BUSY:
            return
        if reason is not None:
            self._listener.count_close(reason)
        log.debug("closing connection", extra={"reason": reason})
        self._transport.abort()


def connection_of(request: web.BaseRequest) -> _Connection | None:
    """The listener's wrapper of the connection ``request`` came on (None when the app runs
    behind another server, e.g. the aiohttp test client)."""
    transport = request.transport
    if transport is None:
        return None
    protocol = transport.get_protocol()
    return protocol if isinstance(protocol, _Connection) else None


class Listener:
    """Accepts TLS connections on ``sock`` for ``handler_factory`` (an aiohttp ``Server``)."""

    def __init__(
        self,
        handler_factory: Callable[[], asyncio.Protocol],
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        limits: Limits,
        *,
        on_close: Callable[[CloseReason], None] | None = None,
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        self.handler_factory = handler_factory
        self.sock = sock
        self.ssl_context = ssl_context
        self.limits = limits
        self._on_close = on_close
        self._on_count = on_count
        self._accepted = 0  # sockets accepted and not yet closed (handshaking or open)
        self._open: set[_Connection] = set()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._closes = 0  # since memory was last handed back
        self._peak = 0  # most connections open since then
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def requests_in_progress(self) -> int:
        """Connections whose current request the app is handling."""
        return sum(1 for conn in self._open if conn.busy)

    @property
    def connections(self) -> int:
        """Connections accepted and not closed yet (including those still handshaking)."""
        return self._accepted

    def start(self) -> None:
        self.sock.setblocking(False)
        self.sock.listen(_ACCEPT_BACKLOG)
        self._task = asyncio.create_task(self._accept_loop(), name="webhook-accept")
        if _MALLOC_TRIM is not None:
            self._trimmer = asyncio.create_task(self._trim_loop(), name="webhook-trim")

    async def stop(self) -> None:
        """Stop accepting and drop connections still handshaking; open connections are the
        app runner's to close (it lets in-flight requests finish)."""
        for task in (self._task, self._trimmer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._trimmer = None
        self.sock.close()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._room.wait()
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as e:
                log.warning("accept failed: %s", e)
                await asyncio.sleep(_ACCEPT_ERROR_PAUSE)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._accepted += 1
            self._peak = max(self._peak, self._accepted)
            self._report()
            if self._accepted >= self.limits.max_connections:
                self._room.clear()
            task = loop.create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        app = _Connection(self.handler_factory(), self)
        tls = _SmallBufferTLS(
            loop,
            app,
            self.ssl_context,
            waiter,
            server_side=True,
            # typeshed says int; asyncio takes any number of seconds
            ssl_handshake_timeout=self.limits.header_timeout,  # type: ignore[arg-type]
            ssl_shutdown_timeout=TLS_SHUTDOWN_SECONDS,
        )
        transport: asyncio.BaseTransport | None = None
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: tls, conn)
            await waiter
        except (OSError, ssl.SSLError, asyncio.CancelledError) as e:
            # Handshake timed out, failed or the peer left: the app never saw it.
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            else:
                conn.close()
            if app not in self._open:
                self._release()
                if not isinstance(e, asyncio.CancelledError):
                    self.count_close(HANDSHAKE_FAILED)
            if isinstance(e, asyncio.CancelledError):
                raise

    # --- bookkeeping, called by _Connection -------------------------------------------------
    def opened(self, conn: _Connection) -> None:
        self._open.add(conn)

    def closed(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._release()

    async def _trim_loop(self) -> None:
        assert _MALLOC_TRIM is not None
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            # Only once a wave has ebbed (half the connections of its peak gone): trimming
            # takes ~20 ms on a 200 MB heap and holds glibc's lock, so not while it rages.
            if self._closes >= TRIM_AFTER_CLOSES and self._accepted <= self._peak // 2:
                self._closes = 0
                self._peak = self._accepted
                # ctypes drops the GIL for the call: the loop keeps serving meanwhile
                await asyncio.to_thread(_MALLOC_TRIM, 0)

    def _release(self) -> None:
        self._closes += 1
        self._accepted -= 1
        self._report()
        if self._accepted < self.limits.max_connections:
            self._room.set()

    def count_close(self, reason: CloseReason) -> None:
        if self._on_close is not None:
            self._on_close(reason)

    def _report(self) -> None:
        if self._on_count is not None:
            self._on_count(self._accepted)
