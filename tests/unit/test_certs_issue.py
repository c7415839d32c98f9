"""certs.issue: what the API server and a TLS client demand of the CA and the serving pair."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.__main__ import main
from certs.issue import (
    CertError,
    cert_matches_key,
    is_signed_by,
    issue_bundle,
    issue_leaf,
    needs_renewal,
    write_bundle,
)

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def bundle():
    return issue_bundle(
        "modelcache-webhook",
        "modelcache-system",
        dns=["localhost"],
        ips=["127.0.0.1", "::1"],
        days=90,
        now=T0,
    )


def test_ca_is_a_ca_and_leaf_is_not(bundle):
    ca = x509.load_pem_x509_certificate(bundle.ca_cert_pem)
    leaf = x509.load_pem_x509_certificate(bundle.cert_pem)
    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_bc.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert leaf_bc.ca is False
    assert not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.issuer == ca.subject
    assert leaf.subject != ca.subject
    assert is_signed_by(bundle.cert_pem, bundle.ca_cert_pem)
    assert cert_matches_key(bundle.cert_pem, bundle.key_pem)
    assert not cert_matches_key(bundle.cert_pem, bundle.ca_key_pem)


def test_keys_are_ecdsa_p256(bundle):
    for pem in (bundle.ca_cert_pem, bundle.cert_pem):
        key = x509.load_pem_x509_certificate(pem).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name == "secp256r1"


def test_leaf_sans_name_every_service_form_plus_extras(bundle):
    leaf = x509.load_pem_x509_certificate(bundle.cert_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "modelcache-webhook",
        "modelcache-webhook.modelcache-system",
        "modelcache-webhook.modelcache-system.svc",
        "modelcache-webhook.modelcache-system.svc.cluster.local",
        "localhost",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_validity_window_and_ca_outlives_leaf(bundle):
    ca = x509.load_pem_x509_certificate(bundle.ca_cert_pem)
    leaf = x509.load_pem_x509_certificate(bundle.cert_pem)
    assert leaf.not_valid_before_utc <= T0 < leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc == T0 + dt.timedelta(days=90)
    assert ca.not_valid_after_utc > leaf.not_valid_after_utc


def test_leaf_never_outlives_its_ca(bundle):
    cert, _ = issue_leaf(bundle.ca_cert_pem, bundle.ca_key_pem, "svc", "ns", days=3000, now=T0)
    ca = x509.load_pem_x509_certificate(bundle.ca_cert_pem)
    assert x509.load_pem_x509_certificate(cert).not_valid_after_utc == ca.not_valid_after_utc


@pytest.mark.parametrize(
    ("after_days", "expected"),
    [(0, False), (59, False), (61, True), (90, True), (400, True)],
)
def test_needs_renewal_at_a_third_of_validity_left(bundle, after_days, expected):
    # validity is 90 days + 5 min backdating: the threshold is just past day 60
    assert needs_renewal(bundle.cert_pem, now=T0 + dt.timedelta(days=after_days)) is expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"service": "Bad_Name", "namespace": "ns"}, "service 'Bad_Name'"),
        ({"service": "svc", "namespace": ""}, "namespace ''"),
        ({"service": "svc", "namespace": "ns", "ips": ["300.1.1.1"]}, "invalid IP"),
        ({"service": "svc", "namespace": "ns", "dns": ["a b"]}, "invalid DNS"),
        ({"service": "svc", "namespace": "ns", "days": 0}, "days must be"),
        ({"service": "svc", "namespace": "ns", "now": dt.datetime(2030, 1, 1)}, "timezone"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(CertError, match=message):
        issue_bundle(**kwargs)


def test_issue_leaf_rejects_a_key_of_another_ca(bundle):
    other = issue_bundle("svc", "ns", now=T0)
    with pytest.raises(CertError, match="does not belong"):
        issue_leaf(bundle.ca_cert_pem, other.ca_key_pem, "svc", "ns", now=T0)
    with pytest.raises(CertError, match="not a PEM certificate"):
        issue_leaf(b"junk", bundle.ca_key_pem, "svc", "ns", now=T0)


def test_write_bundle_files_modes_and_no_ca_key(tmp_path, bundle):
    write_bundle(bundle, tmp_path / "tls")
    out = tmp_path / "tls"
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    assert (out / "tls.crt").read_bytes() == bundle.cert_pem
    assert (out / "ca.crt").read_bytes() == bundle.ca_cert_pem
    assert bundle.ca_key_pem not in b"".join(p.read_bytes() for p in out.iterdir())


def test_write_bundle_refuses_a_mixed_pair_and_leaves_old_files(tmp_path, bundle):
    write_bundle(bundle, tmp_path)
    other = issue_bundle("svc", "ns", now=T0)
    mixed = type(bundle)(bundle.ca_cert_pem, bundle.ca_key_pem, bundle.cert_pem, other.key_pem)
    with pytest.raises(CertError, match="mixed pair"):
        write_bundle(mixed, tmp_path)
    assert (tmp_path / "tls.key").read_bytes() == bundle.key_pem
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_generate_cli_output_serves_tls_that_verifies_by_name(tmp_path: Path):
    """The files a user generates make a working HTTPS endpoint for 'localhost'."""
    rc = main(
        [
            "generate",
            "--service",
            "modelcache-webhook",
            "--namespace",
            "modelcache-system",
            "--out",
            str(tmp_path),
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--days",
            "30",
        ]
    )
    assert rc == 0
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client_ctx = ssl.create_default_context(cafile=tmp_path / "ca.crt")

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(5))
            except (OSError, ssl.SSLError) as exc:
                errors.append(exc)

        t = threading.Thread(target=serve)
        t.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
        t.join(10)
        assert not errors


def test_generate_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    rc = main(["generate", "--service", "BAD", "--namespace", "ns", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "not a DNS-1123 label" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_ca_writes_a_ca_that_issues_and_never_replaces_it(tmp_path: Path, capsys) -> None:
    """``python -m certs ca``: the agents' CA for peer fetch. Its key is private, each peer
    process issues its own client+server certificate from it, and a second run into the
    same directory refuses instead of replacing a CA that nodes already trust."""
    from sidecar.node.peers import PeerTLS

    out = tmp_path / "agents-ca"
    assert main(["ca", "--common-name", "modelcache-agents", "--out", str(out)]) == 0
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert 3650 <= days <= 3651  # ten years (plus the backdating)
    tls = PeerTLS.from_dir(out, node="node-a", ips=["10.0.0.7"])
    assert is_signed_by(tls.cert_pem, (out / "ca.crt").read_bytes())

    key_before = (out / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["ca", "--common-name", "other", "--out", str(out)]) == 2
    assert "refusing to replace a CA" in capsys.readouterr().err
    assert (out / "ca.key").read_bytes() == key_before
