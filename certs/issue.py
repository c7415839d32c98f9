"""Pure certificate issuing for the webhook's serving certificate.

The API server reaches the webhook at ``https://<service>.<namespace>.svc``, so the serving
certificate must name that host; the API server trusts it through the ``caBundle`` of the
MutatingWebhookConfiguration, which holds our own CA (never the leaf itself, so the leaf can be
renewed without touching the webhook configuration as long as the CA stays).

Everything here is pure (bytes in, bytes out) except :func:`write_bundle`, which is the one
file-system edge and writes each file atomically so a reloading server never reads a
half-written pair.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.crt"
TLS_CERT_FILE = "tls.crt"
TLS_KEY_FILE = "tls.key"
CA_KEY_FILE = "ca.key"

# Clock skew between the issuer and the API server must not make a fresh cert "not yet valid".
_BACKDATE = dt.timedelta(minutes=5)
_MAX_DAYS = 3650


class CertError(ValueError):
    """Bad input to the issuer, or PEM that is not what it claims to be."""


@dataclass(frozen=True)
class CertBundle:
    """A CA and a serving pair it signed, all PEM."""

    ca_cert_pem: bytes
    ca_key_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names under which in-cluster clients (and the API server) reach a Service."""
    _check_dns_label("service", service)
    _check_dns_label("namespace", namespace)
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def issue_ca(
    common_name: str, *, days: int = 365, now: dt.datetime | None = None
) -> tuple[bytes, bytes]:
    """A self-signed CA that can sign serving certificates only (pathlen 0)."""
    _check_days(days)
    start = _start(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _BACKDATE)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def issue_leaf(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    service: str,
    namespace: str,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 365,
    now: dt.datetime | None = None,
    client: bool = False,
) -> tuple[bytes, bytes]:
    """A serving certificate for the Service, signed by the given CA: ``(cert_pem, key_pem)``.

    ``client``: the certificate also authenticates its holder as a TLS client (mutual TLS
    between node agents, each both server and client of the others).

    The leaf never outlives its CA: a chain with an expired CA fails anyway, and capping here
    makes :func:`needs_renewal` on the leaf notice a dying CA too.
    """
    _check_days(days)
    names = service_dns_names(service, namespace)
    for extra in dns:
        if not extra or any(c.isspace() for c in extra):
            raise CertError(f"invalid DNS name {extra!r}")
        if extra not in names:
            names.append(extra)
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for ip in ips:
        try:
            addresses.append(ipaddress.ip_address(ip))
        except ValueError as exc:
            raise CertError(f"invalid IP address {ip!r}") from exc

    ca_cert = load_cert(ca_cert_pem)
    ca_key = _load_ec_key(ca_key_pem, "CA key")
    if _spki(ca_cert.public_key()) != _spki(ca_key.public_key()):
        raise CertError("the CA key does not belong to the CA certificate")

    start = _start(now)
    not_after = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{service}.{namespace}.svc")])
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH]
                + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def issue_bundle(
    service: str,
    namespace: str,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 365,
    now: dt.datetime | None = None,
) -> CertBundle:
    """A fresh CA and a serving pair for ``service.namespace``.

    The CA lives twice as long as the leaf so that leaf renewals (at a third of validity left)
    happen several times before the CA, and thus the ``caBundle``, has to change.
    """
    _check_days(days)
    ca_cert, ca_key = issue_ca(
        f"modelcache-ca {service}.{namespace}", days=min(days * 2, _MAX_DAYS), now=now
    )
    cert, key = issue_leaf(
        ca_cert, ca_key, service, namespace, dns=dns, ips=ips, days=days, now=now
    )
    return CertBundle(ca_cert_pem=ca_cert, ca_key_pem=ca_key, cert_pem=cert, key_pem=key)


def needs_renewal(cert_pem: bytes, *, now: dt.datetime | None = None) -> bool:
    """True when less than a third of the certificate's validity is left (or it is expired)."""
    cert = load_cert(cert_pem)
    start = cert.not_valid_before_utc
    end = cert.not_valid_after_utc
    remaining = end - _start(now)
    return remaining * 3 < (end - start)


def cert_matches_key(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the private key belongs to the certificate (a mixed pair must never be served)."""
    try:
        key = _load_ec_key(key_pem, "key")
        cert = load_cert(cert_pem)
    except CertError:
        return False
    return _spki(cert.public_key()) == _spki(key.public_key())


def is_signed_by(cert_pem: bytes, ca_cert_pem: bytes) -> bool:
    """Whether ``cert_pem`` was issued and signed by the CA in ``ca_cert_pem``."""
    try:
        load_cert(cert_pem).verify_directly_issued_by(load_cert(ca_cert_pem))
    except (CertError, ValueError, TypeError, InvalidSignature):
        return False
    return True


def write_bundle(bundle: CertBundle, out_dir: Path) -> None:
    """Write ``ca.crt``, ``tls.crt``, ``tls.key`` (0600) into ``out_dir``.

    Each file is replaced atomically (temp file in the same directory, fsync, rename). The key
    is written before the certificate: a server that reloads when ``tls.crt`` changes then
    always finds the matching key already in place. The CA key is never written here.
    """
    if not cert_matches_key(bundle.cert_pem, bundle.key_pem):
        raise CertError("tls.key does not belong to tls.crt; refusing to write a mixed pair")
    write_pair(out_dir, bundle.cert_pem, bundle.key_pem, ca_cert_pem=bundle.ca_cert_pem)


def write_ca(out_dir: Path, ca_cert_pem: bytes, ca_key_pem: bytes) -> None:
    """Write ``ca.crt`` and ``ca.key`` (0600) into ``out_dir``, key first; an existing
    ``ca.key`` is never replaced (a CA that others trust is not lost by a second run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / CA_KEY_FILE).exists():
        raise CertError(f"{out_dir / CA_KEY_FILE} exists: refusing to replace a CA")
    _atomic_write(out_dir / CA_KEY_FILE, ca_key_pem, 0o600)
    _atomic_write(out_dir / CA_CERT_FILE, ca_cert_pem, 0o644)


def write_pair(
    out_dir: Path, cert_pem: bytes, key_pem: bytes, *, ca_cert_pem: bytes | None = None
) -> None:
    """Write the serving pair (and optionally ``ca.crt``) atomically into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if ca_cert_pem is not None:
        _atomic_write(out_dir / CA_CERT_FILE, ca_cert_pem, 0o644)
    _atomic_write(out_dir / TLS_KEY_FILE, key_pem, 0o600)
    _atomic_write(out_dir / TLS_CERT_FILE, cert_pem, 0o644)


def load_cert(pem: bytes) -> x509.Certificate:
    """Parse one PEM certificate, with a clear error when it is not one."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertError(f"not a PEM certificate: {exc}") from exc


def _load_ec_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{what} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{what} is not an ECDSA key")
    return key


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _start(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise CertError("now must be timezone-aware")
    return now.astimezone(dt.UTC)


def _check_days(days: int) -> None:
    if not 1 <= days <= _MAX_DAYS:
        raise CertError(f"days must be between 1 and {_MAX_DAYS}, got {days}")


def _check_dns_label(what: str, value: str) -> None:
    ok = (
        0 < len(value) <= 63
        and value[0].isalnum()
        and value[-1].isalnum()
        and all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in value)
    )
    if not ok:
        raise CertError(f"{what} {value!r} is not a DNS-1123 label (lowercase, digits, '-')")
