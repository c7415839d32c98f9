"""In-cluster certificate bootstrap: one Secret is the source of truth, the webhook trusts it.

``install`` runs at every webhook pod start (an init container) and so on every replica at
once; everything it does is therefore a compare-and-swap on the API server:

- the Secret is created once (a lost create race is ``409 AlreadyExists``: we re-read and
  use the winner's CA and pair instead of ours), reused while valid, and replaced with the
  ``resourceVersion`` we read (``409 Conflict``: someone else renewed first; re-read, retry);
- the ``caBundle`` of every webhook in the MutatingWebhookConfiguration is patched only when it
  differs, by a JSON patch that carries the ``resourceVersion`` we read as a precondition and
  ``test``s each webhook's name, so a concurrent edit makes the patch fail instead of writing
  our bundle into the wrong webhook;
- after patching, the Secret is read again: if another replica rotated the CA meanwhile, the
  loop goes round once more so the bundle always ends up matching the Secret.

When the CA itself is rotated, the previous CA stays in the Secret (``ca-previous.crt``) and in
the ``caBundle`` until it expires, so replicas that still serve a leaf of the old CA keep
being trusted until they restart.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from certs.issue import (
    CA_CERT_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    CertBundle,
    CertError,
    cert_matches_key,
    is_signed_by,
    issue_bundle,
    issue_ca,
    issue_leaf,
    load_cert,
    needs_renewal,
    service_dns_names,
    write_pair,
)

log = logging.getLogger(__name__)

CA_KEY_KEY = "ca.key"
CA_PREVIOUS_KEY = "ca-previous.crt"
SECRET_TYPE = "kubernetes.io/tls"
#: Seconds per API request: an init container must fail (and be retried) rather than hang.
REQUEST_TIMEOUT = 30
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "modelcache-certs"

SecretAction = Literal["created", "adopted", "reused", "renewed-leaf", "renewed-ca", "reissued"]


class InstallError(RuntimeError):
    """The cluster state does not let us install (wrong Secret type, no webhook config...)."""


@dataclass(frozen=True)
class InstallResult:
    """What one run did: the Secret's fate, whether the caBundle changed, the pair in force."""

    secret_action: SecretAction
    ca_bundle_patched: bool
    bundle: CertBundle
    ca_bundle_pem: bytes


@dataclass(frozen=True)
class StoredCerts:
    """What the Secret holds: the CA and pair, and the previous CA while it is still trusted."""

    bundle: CertBundle
    previous_ca_pem: bytes | None


def install(
    api: k8s.ApiClient,
    *,
    service: str,
    namespace: str,
    secret: str,
    webhook_config: str,
    days: int = 365,
    dns: Sequence[str] = (),
    cert_dir: Path | None = None,
    now: dt.datetime | None = None,
    attempts: int = 8,
) -> InstallResult:
    """Make the Secret hold a valid CA and serving pair and the webhooks trust that CA."""
    core = k8s.CoreV1Api(api)
    admission = k8s.AdmissionregistrationV1Api(api)
    first_action: SecretAction | None = None
    patched_any = False
    for _ in range(attempts):
        action, stored = ensure_secret(
            core,
            service=service,
            namespace=namespace,
            secret=secret,
            days=days,
            dns=dns,
            now=now,
            attempts=attempts,
        )
        first_action = first_action or action
        ca_bundle = trusted_bundle(stored, now=now)
        patched_any |= sync_ca_bundle(admission, webhook_config, ca_bundle, attempts=attempts)
        # Another replica may have rotated the CA between our read and our patch; the
        # Secret decides, so converge on what it holds now.
        again = _read_secret(core, namespace, secret)
        if again is not None and _decode(again) == stored:
            if cert_dir is not None:
                write_pair(
                    cert_dir,
                    stored.bundle.cert_pem,
                    stored.bundle.key_pem,
                    ca_cert_pem=stored.bundle.ca_cert_pem,
                )
            log.info(
                "certificates in place",
                extra={"secret": f"{namespace}/{secret}", "action": first_action},
            )
            return InstallResult(first_action, patched_any, stored.bundle, ca_bundle)
    raise InstallError(
        f"Secret {namespace}/{secret} kept changing under us for {attempts} attempts"
    )


def ensure_secret(
    core: k8s.CoreV1Api,
    *,
    service: str,
    namespace: str,
    secret: str,
    days: int = 365,
    dns: Sequence[str] = (),
    now: dt.datetime | None = None,
    attempts: int = 8,
) -> tuple[SecretAction, StoredCerts]:
    """Create, reuse or renew the Secret; returns what was done and what it now holds."""
    names = [*service_dns_names(service, namespace), *dns]
    lost_create = False
    for _ in range(attempts):
        current = _read_secret(core, namespace, secret)
        if current is None:
            bundle = issue_bundle(service, namespace, dns=dns, days=days, now=now)
            stored = StoredCerts(bundle, None)
            try:
                core.create_namespaced_secret(
                    namespace, _secret_body(secret, stored), _request_timeout=REQUEST_TIMEOUT
                )
            except ApiException as exc:
                if exc.status == 409:
                    lost_create = True  # another replica won: use its Secret
                    continue
                raise
            return "created", stored

        if current.type != SECRET_TYPE:
            raise InstallError(
                f"Secret {namespace}/{secret} has type {current.type!r}, expected "
                f"{SECRET_TYPE!r}; delete it or choose another --secret"
            )
        have = _decode(current)
        action, wanted = _plan(have, service, namespace, names, dns, days, now)
        if wanted is None:
            assert have is not None
            return ("adopted" if lost_create else action), have
        body = _secret_body(secret, wanted)
        assert body.metadata is not None and current.metadata is not None
        body.metadata.resource_version = current.metadata.resource_version
        try:
            core.replace_namespaced_secret(
                secret, namespace, body, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 409:
                continue  # renewed concurrently: re-read and judge the winner's pair
            raise
        return action, wanted
    raise InstallError(f"Secret {namespace}/{secret} kept changing under us")


def _plan(  # noqa: PLR0917 - private helper, called once with everything it judges
    have: StoredCerts | None,
    service: str,
    namespace: str,
    names: Sequence[str],
    dns: Sequence[str],
    days: int,
    now: dt.datetime | None,
) -> tuple[SecretAction, StoredCerts | None]:
    """Decide from the stored pair alone what (if anything) must be written."""
    if have is None or not _consistent(have.bundle):
        return "reissued", StoredCerts(
            issue_bundle(service, namespace, dns=dns, days=days, now=now), None
        )
    b = have.bundle
    if needs_renewal(b.ca_cert_pem, now=now):
        ca_cert, ca_key = issue_ca(
            load_cert(b.ca_cert_pem).subject.rfc4514_string().removeprefix("CN="),
            days=min(days * 2, 3650),
            now=now,
        )
        cert, key = issue_leaf(ca_cert, ca_key, service, namespace, dns=dns, days=days, now=now)
        previous = b.ca_cert_pem if not _expired(b.ca_cert_pem, now) else None
        return "renewed-ca", StoredCerts(CertBundle(ca_cert, ca_key, cert, key), previous)
    if needs_renewal(b.cert_pem, now=now) or not _covers(b.cert_pem, names):
        cert, key = issue_leaf(
            b.ca_cert_pem, b.ca_key_pem, service, namespace, dns=dns, days=days, now=now
        )
        previous = have.previous_ca_pem
        if previous is not None and _expired(previous, now):
            previous = None
        return "renewed-leaf", StoredCerts(
            CertBundle(b.ca_cert_pem, b.ca_key_pem, cert, key), previous
        )
    return "reused", None


def trusted_bundle(stored: StoredCerts, *, now: dt.datetime | None = None) -> bytes:
    """The caBundle: the current CA, plus the previous one while it can still verify a leaf."""
    pem = stored.bundle.ca_cert_pem
    if stored.previous_ca_pem is not None and not _expired(stored.previous_ca_pem, now):
        pem = pem.rstrip(b"\n") + b"\n" + stored.previous_ca_pem
    return pem


def sync_ca_bundle(
    admission: k8s.AdmissionregistrationV1Api,
    name: str,
    ca_bundle_pem: bytes,
    *,
    attempts: int = 8,
) -> bool:
    """Set ``caBundle`` on every webhook of the configuration; True when a patch was sent."""
    wanted = base64.b64encode(ca_bundle_pem).decode()
    for _ in range(attempts):
        try:
            config = admission.read_mutating_webhook_configuration(
                name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                raise InstallError(
                    f"MutatingWebhookConfiguration {name!r} not found; apply the manifests first"
                ) from exc
            raise
        webhooks = config.webhooks or []
        if not webhooks:
            raise InstallError(f"MutatingWebhookConfiguration {name!r} has no webhooks")
        assert config.metadata is not None
        ops: list[dict[str, Any]] = [
            {
                "op": "replace",
                "path": "/metadata/resourceVersion",
                "value": config.metadata.resource_version,
            }
        ]
        for i, hook in enumerate(webhooks):
            if _b64_text(hook.client_config.ca_bundle) == wanted:
                continue
            ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook.name})
            ops.append(
                {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": wanted}
            )
        if len(ops) == 1:
            return False
        try:
            admission.patch_mutating_webhook_configuration(
                name, ops, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status in (409, 422):
                continue  # edited concurrently: read again and recompute the patch
            raise
        return True
    raise InstallError(f"MutatingWebhookConfiguration {name!r} kept changing under us")


def describe_api_error(exc: ApiException) -> str:
    """One line for an API error: status, reason and the server's message, never the body."""
    message = ""
    try:
        message = str(json.loads(exc.body or "{}").get("message", ""))
    except (ValueError, AttributeError):
        message = ""
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def _b64_text(value: bytes | str | None) -> str | None:
    """The client hands base64 fields back as str or bytes depending on its version."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value


def _read_secret(core: k8s.CoreV1Api, namespace: str, name: str) -> k8s.V1Secret | None:
    try:
        return core.read_namespaced_secret(name, namespace, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _decode(secret: k8s.V1Secret) -> StoredCerts | None:
    """The pair in the Secret, or None when any part is missing or not base64."""
    data = secret.data or {}
    try:
        raw = {k: base64.b64decode(v, validate=True) for k, v in data.items()}
        bundle = CertBundle(
            ca_cert_pem=raw[CA_CERT_FILE],
            ca_key_pem=raw[CA_KEY_KEY],
            cert_pem=raw[TLS_CERT_FILE],
            key_pem=raw[TLS_KEY_FILE],
        )
    except (KeyError, ValueError):
        return None
    return StoredCerts(bundle, raw.get(CA_PREVIOUS_KEY) or None)


def _consistent(b: CertBundle) -> bool:
    """Every part parses, each key belongs to its cert and the leaf was signed by the CA."""
    return (
        cert_matches_key(b.ca_cert_pem, b.ca_key_pem)
        and cert_matches_key(b.cert_pem, b.key_pem)
        and is_signed_by(b.cert_pem, b.ca_cert_pem)
    )


def _covers(cert_pem: bytes, names: Sequence[str]) -> bool:
    try:
        san = load_cert(cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (CertError, x509.ExtensionNotFound):
        return False
    have = set(san.value.get_values_for_type(x509.DNSName))
    return set(names) <= have


def _expired(cert_pem: bytes, now: dt.datetime | None) -> bool:
    when = now.astimezone(dt.UTC) if now is not None else dt.datetime.now(dt.UTC)
    try:
        return load_cert(cert_pem).not_valid_after_utc <= when
    except CertError:
        return True


def _secret_body(name: str, stored: StoredCerts) -> k8s.V1Secret:
    b = stored.bundle
    data = {
        CA_CERT_FILE: b.ca_cert_pem,
        CA_KEY_KEY: b.ca_key_pem,
        TLS_CERT_FILE: b.cert_pem,
        TLS_KEY_FILE: b.key_pem,
    }
    if stored.previous_ca_pem is not None:
        data[CA_PREVIOUS_KEY] = stored.previous_ca_pem
    return k8s.V1Secret(
        api_version="v1",
        kind="Secret",
        type=SECRET_TYPE,
        metadata=k8s.V1ObjectMeta(name=name, labels={MANAGED_BY_LABEL: MANAGED_BY}),
        data={k: base64.b64encode(v).decode() for k, v in data.items()},
    )
