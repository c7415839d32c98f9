"""The real server (``python -m webhook serve``) over real TLS, with a client that trusts only
our CA and verifies the hostname: admission, TLS 1.1 refused, and a Secret-volume cert swap
under concurrent load with zero failed requests."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import socket
import ssl
import time
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from cryptography import x509

from certs.issue import CertBundle, issue_bundle, issue_leaf
from tests.fixtures.webhook_server import SecretVolume, make_review, model_pod, served_cert

SERVICE, NAMESPACE = "modelcache-webhook", "modelcache-system"


def _bundle() -> CertBundle:
    return issue_bundle(SERVICE, NAMESPACE, dns=["localhost"], ips=["127.0.0.1"])


@pytest.fixture(scope="module")
def bundle_a() -> CertBundle:
    return _bundle()


@pytest.fixture(scope="module")
def bundle_b() -> CertBundle:
    return _bundle()


def _publish(vol: SecretVolume, cert: bytes, key: bytes) -> None:
    vol.publish({"tls.crt": cert, "tls.key": key})


def _client_ctx(*cas: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata="".join(c.decode() for c in cas))
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


async def _peer_cert(port: int, ctx: ssl.SSLContext) -> x509.Certificate:
    """The certificate a brand-new connection is served."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


async def _until_ready(session: aiohttp.ClientSession, url: str) -> None:
    """/readyz turns 200 once the pipeline is warm (the port opens before that)."""
    deadline = time.monotonic() + 60
    for _ in range(3000):
        async with session.get(f"{url}/readyz") as resp:
            if resp.status == 200:
                return
            assert resp.status == 503
        assert time.monotonic() < deadline, "server not ready in time"
        await asyncio.sleep(0.02)  # polling a condition with a deadline


async def _admit(session: aiohttp.ClientSession, url: str, uid: str) -> dict[str, Any]:
    doc = make_review(model_pod(), uid=uid)
    async with session.post(f"{url}/mutate", json=doc) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
    assert body["response"]["uid"] == uid
    assert body["response"]["allowed"] is True
    return body


async def test_admission_over_https_with_only_the_ca_trusted(
    webhook_process: Any, tmp_path: Path, bundle_a: CertBundle, bundle_b: CertBundle
) -> None:
    vol = SecretVolume(tmp_path / "tls")
    _publish(vol, bundle_a.cert_pem, bundle_a.key_pem)
    wp = webhook_process(["--tls-cert", str(vol.cert), "--tls-key", str(vol.key)])
    ctx = _client_ctx(bundle_a.ca_cert_pem)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        await _until_ready(session, wp.url)
        pod = model_pod()
        body = await _admit(session, wp.url, "tls-1")
        patch = json.loads(base64.b64decode(body["response"]["patch"]))
        mutated = jsonpatch.apply_patch(copy.deepcopy(pod), patch)
        from tests.http.test_mutate import check_pod

        check_pod(mutated)
        async with session.get(f"{wp.url}/metrics") as resp:
            assert (
                'modelcache_webhook_admissions_total{decision="injected"} 1.0' in await resp.text()
            )

    # Verification is really on: a client trusting another CA, or expecting another name, fails.
    with pytest.raises(ssl.SSLCertVerificationError):
        await _peer_cert(wp.port, _client_ctx(bundle_b.ca_cert_pem))
    wrong_name = _client_ctx(bundle_a.ca_cert_pem)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1", wp.port, ssl=wrong_name, server_hostname="evil.example"
        )


def _tls11_client(cafile: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 needs level 0 to offer TLS 1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated: the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def test_dev_mode_serves_tls12_and_refuses_tls11(webhook_process: Any) -> None:
    wp = webhook_process(["--dev"])
    ca_lines = [line for line in wp.stdout_lines if line.startswith("dev CA certificate: ")]
    assert ca_lines, wp.stdout_lines
    cafile = ca_lines[0].split(": ", 1)[1]
    assert Path(cafile).is_file()

    ctx = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection(("127.0.0.1", wp.port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")

    # Control: the TLS 1.1 client does work against a server that allows TLS 1.1, so the
    # refusal below comes from our server, not from the client being unable to speak 1.1.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1_1
    permissive.load_cert_chain(Path(cafile).with_name("tls.crt"), Path(cafile).with_name("tls.key"))
    ca_pem = Path(cafile).read_text()
    assert served_cert(permissive, ca_pem, client_ctx=_tls11_client(cafile)) is not None

    with socket.create_connection(("127.0.0.1", wp.port)) as raw, pytest.raises(ssl.SSLError):
        _tls11_client(cafile).wrap_socket(raw, server_hostname="localhost")


async def _load_worker(
    url: str,
    ctx: ssl.SSLContext,
    stop: asyncio.Event,
    counts: dict[str, int],
    failures: list[str],
    *,
    new_connection_each_time: bool,
    name: str,
) -> None:
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=new_connection_each_time, limit=1)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await _admit(session, url, f"{name}-{n}")
                counts["ok"] += 1
            except (aiohttp.ClientError, AssertionError, OSError, TimeoutError) as e:
                # every failure is recorded and fails the test
                failures.append(f"{name}-{n}: {type(e).__name__}: {e}")


async def _wait_for(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling a condition with a deadline


async def _serial_until_changed(
    port: int, ctx: ssl.SSLContext, old: int, within: float
) -> x509.Certificate:
    deadline = time.monotonic() + within
    while True:
        cert = await _peer_cert(port, ctx)
        if cert.serial_number != old or time.monotonic() > deadline:
            return cert
        await asyncio.sleep(0.1)  # polling the served cert with a deadline


async def test_cert_swap_under_load_drops_nothing(
    webhook_process: Any, tmp_path: Path, bundle_a: CertBundle, bundle_b: CertBundle
) -> None:
    vol = SecretVolume(tmp_path / "tls")
    _publish(vol, bundle_a.cert_pem, bundle_a.key_pem)
    wp = webhook_process(["--tls-cert", str(vol.cert), "--tls-key", str(vol.key)])
    # During the swap the client trusts both CAs (as a caBundle with old+new does).
    ctx = _client_ctx(bundle_a.ca_cert_pem, bundle_b.ca_cert_pem)
    serial_a = (await _peer_cert(wp.port, ctx)).serial_number

    stop = asyncio.Event()
    counts = {"ok": 0}
    failures: list[str] = []
    workers = [
        asyncio.create_task(
            _load_worker(
                wp.url,
                ctx,
                stop,
                counts,
                failures,
                new_connection_each_time=(i % 2 == 1),
                name=f"w{i}",
            )
        )
        for i in range(6)
    ]
    try:
        await _wait_for(lambda: counts["ok"] >= 30, 60, "load before the swap")

        # 1. New leaf from a new CA, via a Secret-volume symlink swap.
        _publish(vol, bundle_b.cert_pem, bundle_b.key_pem)
        cert_b = await _serial_until_changed(wp.port, ctx, serial_a, within=20)
        assert cert_b.serial_number != serial_a
        assert cert_b.issuer == x509.load_pem_x509_certificate(bundle_b.ca_cert_pem).subject
        after_first = counts["ok"]
        await _wait_for(lambda: counts["ok"] >= after_first + 30, 60, "load after the swap")

        # 2. New leaf from the same CA.
        leaf_cert, leaf_key = issue_leaf(
            bundle_b.ca_cert_pem,
            bundle_b.ca_key_pem,
            SERVICE,
            NAMESPACE,
            dns=["localhost"],
            ips=["127.0.0.1"],
        )
        _publish(vol, leaf_cert, leaf_key)
        cert_c = await _serial_until_changed(wp.port, ctx, cert_b.serial_number, within=20)
        assert cert_c.serial_number == x509.load_pem_x509_certificate(leaf_cert).serial_number
        after_second = counts["ok"]
        await _wait_for(lambda: counts["ok"] >= after_second + 30, 60, "load after 2nd swap")
    finally:
        stop.set()
        await asyncio.gather(*workers)

    assert failures == []
    assert counts["ok"] >= 90
    assert sum("serving certificate reloaded" in line for line in wp.stderr_lines) == 2
