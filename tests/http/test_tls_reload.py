"""CertReloader: TLS 1.2+ context, in-place reload on Secret-volume symlink swaps and file
rewrites, and a bad pair never replacing a good one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certs.issue import CertBundle, issue_bundle, issue_leaf
from tests.fixtures.webhook_server import SecretVolume, served_cert
from webhook.tls import CertReloader, TLSError, build_server_context


@pytest.fixture(scope="module")
def bundle_a() -> CertBundle:
    return issue_bundle("modelcache-webhook", "modelcache-system", dns=["localhost"])


@pytest.fixture(scope="module")
def bundle_b() -> CertBundle:
    return issue_bundle("modelcache-webhook", "modelcache-system", dns=["localhost"])


def _files(b: CertBundle) -> dict[str, bytes]:
    return {"tls.crt": b.cert_pem, "tls.key": b.key_pem, "ca.crt": b.ca_cert_pem}


def _trust(*bundles: CertBundle) -> str:
    return "".join(b.ca_cert_pem.decode() for b in bundles)


def test_context_is_tls12_minimum(tmp_path: Path, bundle_a: CertBundle) -> None:
    vol = SecretVolume(tmp_path)
    vol.publish(_files(bundle_a))
    ctx = build_server_context(vol.cert, vol.key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_missing_or_mismatched_pair_is_a_clear_error(
    tmp_path: Path, bundle_a: CertBundle, bundle_b: CertBundle
) -> None:
    with pytest.raises(TLSError, match=r"tls\.crt"):
        build_server_context(tmp_path / "tls.crt", tmp_path / "tls.key")
    (tmp_path / "a.crt").write_bytes(bundle_a.cert_pem)
    (tmp_path / "b.key").write_bytes(bundle_b.key_pem)
    with pytest.raises(TLSError, match=r"cert=.*a\.crt key=.*b\.key"):
        build_server_context(tmp_path / "a.crt", tmp_path / "b.key")


def test_symlink_swap_reloads_the_same_context(
    tmp_path: Path, bundle_a: CertBundle, bundle_b: CertBundle
) -> None:
    vol = SecretVolume(tmp_path)
    vol.publish(_files(bundle_a))
    results: list[str] = []
    reloader = CertReloader(vol.cert, vol.key, on_result=results.append)
    ctx = reloader.context
    serial_a = served_cert(ctx, _trust(bundle_a)).serial_number
    assert reloader.check() is False  # nothing changed yet

    vol.publish(_files(bundle_b))
    assert reloader.check() is True
    assert reloader.context is ctx
    assert served_cert(ctx, _trust(bundle_b)).serial_number != serial_a
    assert results == ["success"]
    assert reloader.check() is False


def test_in_place_rewrite_reloads(tmp_path: Path, bundle_a: CertBundle) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(bundle_a.cert_pem)
    key.write_bytes(bundle_a.key_pem)
    reloader = CertReloader(cert, key)
    new_cert, new_key = issue_leaf(
        bundle_a.ca_cert_pem,
        bundle_a.ca_key_pem,
        "modelcache-webhook",
        "modelcache-system",
        dns=["localhost"],
    )
    key.write_bytes(new_key)
    cert.write_bytes(new_cert)
    assert reloader.check() is True
    served = served_cert(reloader.context, _trust(bundle_a))
    assert served.public_bytes(Encoding.PEM) == new_cert


@pytest.mark.parametrize("broken", ["mismatched", "garbage", "truncated", "key-missing"])
def test_bad_update_keeps_the_old_pair_and_logs(
    tmp_path: Path,
    bundle_a: CertBundle,
    bundle_b: CertBundle,
    broken: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    vol = SecretVolume(tmp_path)
    vol.publish(_files(bundle_a))
    results: list[str] = []
    reloader = CertReloader(vol.cert, vol.key, on_result=results.append)
    serial_a = served_cert(reloader.context, _trust(bundle_a)).serial_number
    files = {
        "mismatched": {"tls.crt": bundle_b.cert_pem, "tls.key": bundle_a.key_pem},
        "garbage": {"tls.crt": b"not a cert", "tls.key": bundle_b.key_pem},
        "truncated": {"tls.crt": bundle_b.cert_pem[:200], "tls.key": bundle_b.key_pem},
        "key-missing": {"tls.crt": bundle_b.cert_pem},
    }[broken]
    with caplog.at_level(logging.ERROR, logger="webhook.tls"):
        vol.publish(files)
        assert reloader.check() is False
    if broken != "key-missing":  # a missing file is "mid-swap": retried silently
        assert results == ["failure"]
        assert "keeping the previous one" in caplog.text
    assert served_cert(reloader.context, _trust(bundle_a)).serial_number == serial_a
    # The next good update is picked up.
    vol.publish(_files(bundle_b))
    assert reloader.check() is True
    assert served_cert(reloader.context, _trust(bundle_b)).serial_number != serial_a


async def test_watch_task_reloads_without_being_asked(
    tmp_path: Path, bundle_a: CertBundle, bundle_b: CertBundle
) -> None:
    vol = SecretVolume(tmp_path)
    vol.publish(_files(bundle_a))
    reloaded = asyncio.Event()
    reloader = CertReloader(vol.cert, vol.key, on_result=lambda _result: reloaded.set())
    serial_a = served_cert(reloader.context, _trust(bundle_a)).serial_number
    task = asyncio.create_task(reloader.watch(interval=0.05))
    try:
        vol.publish(_files(bundle_b))
        await asyncio.wait_for(reloaded.wait(), timeout=10)
        assert reloader.reloads == 1
        assert served_cert(reloader.context, _trust(bundle_b)).serial_number != serial_a
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
