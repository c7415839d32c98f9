"""The admission server under hostile clients, over real TLS on loopback (``app.serving``):
trickled headers, trickled bodies, silent and idle connections are closed within their
deadlines while normal admissions keep answering; the connection bound holds; a hang-up is
not an error; requests past the in-flight bound get a 503 at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from certs.issue import issue_bundle, write_bundle
from tests.fixtures.webhook_server import make_app, make_review, model_pod
from webhook.app import serving
from webhook.config import Config
from webhook.listener import Listener
from webhook.pipeline import AdmissionResult, admit_pod
from webhook.state import STATE
from webhook.tls import build_server_context

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.5
# How late a close may come on a shared 2-core machine (scheduling, TLS teardown).
SLACK = 2.0
TRICKLE_EVERY = 0.1  # seconds between the bytes a slow client sends (pacing, not syncing)


@dataclass
class Served:
    port: int
    client_ctx: ssl.SSLContext
    app: Any
    listener: Listener

    def metric(self, name: str, **labels: str) -> float:
        value = self.app[STATE].metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else float(value)


def _config(**overrides: Any) -> Config:
    base: dict[str, Any] = {
        "header_timeout_seconds": HEADER_TIMEOUT,
        "body_timeout_seconds": BODY_TIMEOUT,
        "idle_timeout_seconds": IDLE_TIMEOUT,
    }
    return Config(**{**base, **overrides})


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    bundle = issue_bundle(
        "modelcache-webhook", "modelcache-system", dns=["localhost"], ips=["127.0.0.1"]
    )
    write_bundle(bundle, out)
    return out


@pytest.fixture
def serve(tls_files: Path) -> Callable[..., Any]:
    """``async with serve(config, **build_app_kw) as served``: the app on a free port."""

    def start(config: Config, **kw: Any) -> Any:
        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[Served]:
            app = make_app(config, **kw)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            ctx = build_server_context(tls_files / "tls.crt", tls_files / "tls.key")
            async with serving(app, sock, ctx, shutdown_timeout=2.0) as listener:
                await asyncio.wait_for(app[STATE].warmed_event.wait(), 60)
                client = ssl.create_default_context(cafile=str(tls_files / "ca.crt"))
                yield Served(port, client, app, listener)

        return run()

    return start


async def _closed_after(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the server closes the connection (EOF or reset), read bounded."""
    start = time.monotonic()
    async with asyncio.timeout(within):
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                break
            if not data:
                break
    return time.monotonic() - start


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data`` one byte at a time until it is sent or the server closes."""
    for byte in data:
        if writer.is_closing():
            return
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return
        await asyncio.sleep(TRICKLE_EVERY)


def _request_head(body_len: int) -> bytes:
    return (
        "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {body_len}\r\n\r\n"
    ).encode()


async def _admissions(served: Served, until: asyncio.Event) -> list[float]:
    """Normal admissions on one keep-alive connection until ``until`` is set; latencies."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(ssl=served.client_ctx)
    async with aiohttp.ClientSession(connector=connector) as session:
        for n in range(2000):  # bounded; ends when the slow clients are done
            if until.is_set():
                break
            body = make_review(model_pod(), uid=f"normal-{n}")
            t0 = time.monotonic()
            async with session.post(f"https://localhost:{served.port}/mutate", json=body) as r:
                assert r.status == 200
                assert (await r.json())["response"]["allowed"] is True
            latencies.append(time.monotonic() - t0)
    return latencies


async def test_trickled_headers_and_body_are_cut_off_while_admissions_continue(
    serve: Callable[..., Any],
) -> None:
    # fewer admission slots than slow bodies: requests still arriving must not take them
    async with serve(_config(max_requests_in_flight=2)) as served:
        body = json.dumps(make_review(model_pod())).encode()
        slow_head = [
            await asyncio.open_connection("127.0.0.1", served.port, ssl=served.client_ctx)
            for _ in range(5)
        ]
        slow_body = [
            await asyncio.open_connection("127.0.0.1", served.port, ssl=served.client_ctx)
            for _ in range(5)
        ]
        for _, writer in slow_body:  # headers at once, then the body byte by byte
            writer.write(_request_head(len(body)))
        trickles = [
            asyncio.create_task(_trickle(w, _request_head(len(body)))) for _, w in slow_head
        ]
        trickles += [asyncio.create_task(_trickle(w, body)) for _, w in slow_body]
        done = asyncio.Event()
        normal = asyncio.create_task(_admissions(served, done))
        head_times = await asyncio.gather(
            *(_closed_after(r, HEADER_TIMEOUT + SLACK + 5) for r, _ in slow_head)
        )
        body_times = await asyncio.gather(
            *(_closed_after(r, BODY_TIMEOUT + SLACK + 5) for r, _ in slow_body)
        )
        done.set()
        latencies = await normal
        await asyncio.gather(*trickles)
        for _, w in slow_head + slow_body:
            w.close()

        # the trickle would have taken len(head) * 0.1 s (>= 8 s): the deadline cut it
        assert all(HEADER_TIMEOUT * 0.9 <= t <= HEADER_TIMEOUT + SLACK for t in head_times)
        # body deadline counts from the headers, plus the short linger after the 408
        assert all(BODY_TIMEOUT * 0.9 <= t <= BODY_TIMEOUT + 1.0 + SLACK for t in body_times)
        assert len(latencies) >= 5
        assert max(latencies) < 1.0, latencies
        assert (
            served.metric("modelcache_webhook_connections_closed_total", reason="header_timeout")
            == 5
        )
        assert (
            served.metric("modelcache_webhook_connections_closed_total", reason="body_timeout") == 5
        )
        assert served.metric("modelcache_webhook_errors_total", stage="internal") == 0


async def test_silent_and_idle_connections_are_closed(serve: Callable[..., Any]) -> None:
    async with serve(_config()) as served:
        # TCP connect, never a TLS handshake
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        silent = await _closed_after(reader, HEADER_TIMEOUT + SLACK + 5)
        writer.close()
        assert HEADER_TIMEOUT * 0.9 <= silent <= HEADER_TIMEOUT + SLACK
        assert served.metric("modelcache_webhook_connections_closed_total", reason="handshake") == 1

        # TLS, one request, then idle: closed after the idle timeout, not the header one
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", served.port, ssl=served.client_ctx
        )
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        idle = await _closed_after(reader, IDLE_TIMEOUT + SLACK + 5)
        writer.close()
        assert IDLE_TIMEOUT * 0.9 <= idle <= IDLE_TIMEOUT + 15 / 16 + SLACK
        assert (
            served.metric("modelcache_webhook_connections_closed_total", reason="idle_timeout") == 1
        )
        for _ in range(100):  # the gauge follows the close (bounded wait for the callback)
            if served.listener.connections == 0:
                break
            await asyncio.sleep(0.01)
        assert served.listener.connections == 0
        assert served.metric("modelcache_webhook_open_connections") == 0


async def test_connections_beyond_the_bound_wait_for_a_free_slot(
    serve: Callable[..., Any],
) -> None:
    async with serve(_config(max_connections=2, header_timeout_seconds=3.0)) as served:
        held = [
            await asyncio.open_connection("127.0.0.1", served.port, ssl=served.client_ctx)
            for _ in range(2)
        ]
        # the third TCP connect completes in the kernel, but no handshake until a slot frees
        third = asyncio.create_task(
            asyncio.open_connection("127.0.0.1", served.port, ssl=served.client_ctx)
        )
        await asyncio.sleep(0.5)  # long enough for a handshake that would be served
        assert not third.done()
        assert served.listener.connections == 2
        held[0][1].close()
        reader, writer = await asyncio.wait_for(third, 10)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        for _, w in [held[1], (reader, writer)]:
            w.close()


async def test_a_hang_up_mid_body_is_not_an_error(
    serve: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(_config()) as served:
        body = json.dumps(make_review(model_pod())).encode()
        for cut in (0, len(body) // 2):
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", served.port, ssl=served.client_ctx
            )
            writer.write(_request_head(len(body)) + body[:cut])
            await writer.drain()
            for _ in range(500):  # until the server is reading this request's body (bounded)
                if served.listener.requests_in_progress == 1:
                    break
                await asyncio.sleep(0.01)
            assert served.listener.requests_in_progress == 1
            writer.transport.abort()
        for _ in range(200):  # bounded wait for the server to notice both
            if served.metric("modelcache_webhook_client_disconnects_total") >= 2:
                break
            await asyncio.sleep(0.02)
        # a normal admission right after still works
        connector = aiohttp.TCPConnector(ssl=served.client_ctx)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://localhost:{served.port}/mutate"
            async with session.post(url, json=make_review(model_pod())) as resp:
                assert resp.status == 200
        assert served.metric("modelcache_webhook_client_disconnects_total") == 2
        assert served.metric("modelcache_webhook_errors_total", stage="internal") == 0
        assert served.metric("modelcache_webhook_errors_total", stage="read") == 0
    assert not [r for r in caplog.records if r.exc_info], "a hang-up logged a traceback"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_requests_past_the_in_flight_bound_get_503_at_once(
    serve: Callable[..., Any],
) -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow_admit(pod: dict[str, Any], **kw: Any) -> AdmissionResult:
        if pod["metadata"].get("generateName") == "hold-":
            entered.set()
            release.wait(30)
        return admit_pod(pod, **kw)

    config = _config(max_requests_in_flight=1, body_timeout_seconds=5.0)
    # offload every pod to a worker thread, so the held admission leaves the loop free
    async with serve(config, admit=slow_admit, offload_bytes=0) as served:
        held_pod = model_pod()
        held_pod["metadata"]["generateName"] = "hold-"
        connector = aiohttp.TCPConnector(ssl=served.client_ctx)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://localhost:{served.port}/mutate"
            held = asyncio.create_task(session.post(url, json=make_review(held_pod)))
            assert await asyncio.to_thread(entered.wait, 30)
            t0 = time.monotonic()
            async with session.post(url, json=make_review(model_pod())) as resp:
                assert resp.status == 503
                assert "maxRequestsInFlight" in (await resp.json())["reason"]
            assert time.monotonic() - t0 < 1.0
            release.set()
            resp = await held
            assert resp.status == 200
            resp.release()
        assert served.metric("modelcache_webhook_rejected_requests_total", bound="in_flight") == 1
