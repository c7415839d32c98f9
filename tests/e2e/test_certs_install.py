"""certs install against the loopback API stand-in, through the real kubernetes client."""

from __future__ import annotations

import base64
import datetime as dt
import threading
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from certs.__main__ import main
from certs.install import InstallError, InstallResult, install
from certs.issue import cert_matches_key, is_signed_by, load_cert, needs_renewal

NS = "modelcache-system"
SVC = "modelcache-webhook"
SECRET = "modelcache-webhook-tls"
MWC = "modelcache-webhook"
SECRET_PATH = f"/api/v1/namespaces/{NS}/secrets/{SECRET}"
SECRETS_PATH = f"/api/v1/namespaces/{NS}/secrets"
MWC_PATH = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{MWC}"
WRITES = ("POST", "PUT", "PATCH")


def _webhook(name: str) -> dict:
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "clientConfig": {"service": {"name": SVC, "namespace": NS, "path": "/mutate"}},
    }


@pytest.fixture
def api(kube_api):
    kube_api.put(
        MWC_PATH,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": MWC},
            "webhooks": [_webhook("namespace.inject.modelcache.io"), _webhook("pod.x.io")],
        },
    )
    with kube_api.api_client() as client:
        yield client


def run(api_client, **kw) -> InstallResult:
    args = {"service": SVC, "namespace": NS, "secret": SECRET, "webhook_config": MWC} | kw
    return install(api_client, **args)


def secret_data(kube_api) -> dict[str, bytes]:
    obj = kube_api.get(SECRET_PATH)
    assert obj is not None
    return {k: base64.b64decode(v) for k, v in obj["data"].items()}


def ca_bundles(kube_api) -> list[bytes]:
    return [
        base64.b64decode(w["clientConfig"]["caBundle"]) for w in kube_api.get(MWC_PATH)["webhooks"]
    ]


def writes(kube_api) -> list[tuple[str, str]]:
    return [r for r in kube_api.requests if r[0] in WRITES]


def assert_converged(kube_api) -> dict[str, bytes]:
    """The Secret holds a consistent pair and every webhook trusts exactly its CA."""
    data = secret_data(kube_api)
    assert kube_api.get(SECRET_PATH)["type"] == "kubernetes.io/tls"
    assert cert_matches_key(data["tls.crt"], data["tls.key"])
    assert cert_matches_key(data["ca.crt"], data["ca.key"])
    assert is_signed_by(data["tls.crt"], data["ca.crt"])
    expected = data["ca.crt"]
    if "ca-previous.crt" in data:
        expected = expected.rstrip(b"\n") + b"\n" + data["ca-previous.crt"]
    assert ca_bundles(kube_api) == [expected, expected]
    return data


def test_first_install_creates_secret_and_patches_every_webhook(kube_api, api, tmp_path):
    result = run(api, cert_dir=tmp_path / "tls")
    assert (result.secret_action, result.ca_bundle_patched) == ("created", True)
    data = assert_converged(kube_api)
    assert sorted(data) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    assert (tmp_path / "tls" / "tls.crt").read_bytes() == data["tls.crt"]
    assert (tmp_path / "tls" / "tls.key").read_bytes() == data["tls.key"]
    assert (tmp_path / "tls" / "ca.crt").read_bytes() == data["ca.crt"]
    assert not (tmp_path / "tls" / "ca.key").exists()
    assert kube_api.count("PATCH", MWC_PATH) == 1


def test_second_install_changes_nothing(kube_api, api):
    run(api)
    before_secret, before_mwc = kube_api.get(SECRET_PATH), kube_api.get(MWC_PATH)
    kube_api.requests.clear()
    result = run(api)
    assert (result.secret_action, result.ca_bundle_patched) == ("reused", False)
    assert writes(kube_api) == []
    assert kube_api.get(SECRET_PATH) == before_secret
    assert kube_api.get(MWC_PATH) == before_mwc


def test_leaf_near_expiry_is_renewed_under_the_same_ca(kube_api, api):
    t0 = dt.datetime.now(dt.UTC)
    run(api, days=90, now=t0)
    old = secret_data(kube_api)
    later = t0 + dt.timedelta(days=70)
    assert needs_renewal(old["tls.crt"], now=later)
    result = run(api, days=90, now=later)
    assert (result.secret_action, result.ca_bundle_patched) == ("renewed-leaf", False)
    new = assert_converged(kube_api)
    assert new["ca.crt"] == old["ca.crt"]
    assert new["tls.crt"] != old["tls.crt"]
    assert not needs_renewal(new["tls.crt"], now=later)
    # and now it is stable again
    assert run(api, days=90, now=later).secret_action == "reused"


def test_ca_near_expiry_is_rotated_and_old_ca_kept_trusted(kube_api, api):
    t0 = dt.datetime.now(dt.UTC)
    run(api, days=90, now=t0)  # CA lives 180 days
    old = secret_data(kube_api)
    later = t0 + dt.timedelta(days=150)
    result = run(api, days=90, now=later)
    assert (result.secret_action, result.ca_bundle_patched) == ("renewed-ca", True)
    new = assert_converged(kube_api)
    assert new["ca.crt"] != old["ca.crt"]
    assert new["ca-previous.crt"] == old["ca.crt"]
    assert not needs_renewal(new["ca.crt"], now=later)
    # once the old CA has expired it leaves the bundle at the next leaf renewal
    much_later = t0 + dt.timedelta(days=225)
    assert run(api, days=90, now=much_later).secret_action == "renewed-leaf"
    assert "ca-previous.crt" not in assert_converged(kube_api)


def test_service_rename_reissues_leaf_with_new_names(kube_api, api):
    run(api)
    result = run(api, dns=["webhook.example.internal"])
    assert result.secret_action == "renewed-leaf"
    san = load_cert(secret_data(kube_api)["tls.crt"]).extensions.get_extension_for_oid(
        __import__("cryptography").x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME
    )
    assert "webhook.example.internal" in str(san.value)


def test_only_differing_webhooks_are_patched(kube_api, api):
    run(api)
    mwc = kube_api.get(MWC_PATH)
    mwc["webhooks"][1]["clientConfig"]["caBundle"] = base64.b64encode(b"stale").decode()
    kube_api.put(MWC_PATH, mwc)
    kube_api.requests.clear()
    result = run(api)
    assert result.ca_bundle_patched
    assert_converged(kube_api)
    assert writes(kube_api) == [("PATCH", MWC_PATH)]


def test_broken_secret_is_reissued(kube_api, api):
    run(api)
    obj = kube_api.get(SECRET_PATH)
    del obj["data"]["ca.key"]
    kube_api.put(SECRET_PATH, obj)
    assert run(api).secret_action == "reissued"
    assert_converged(kube_api)


def test_wrong_secret_type_and_missing_config_are_clear_errors(kube_api, api):
    kube_api.put(
        SECRET_PATH,
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": SECRET}},
    )
    with pytest.raises(InstallError, match="type 'Opaque'"):
        run(api)
    with pytest.raises(InstallError, match="'nope' not found"):
        run(api, secret="other", webhook_config="nope")


def _race(kube_api, n: int = 2, **kw) -> list[InstallResult]:
    results: list[InstallResult] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with kube_api.api_client() as client:
                results.append(run(client, **kw))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == n
    return results


def test_two_replicas_racing_to_create_end_with_one_secret(kube_api, api):
    # both read "no Secret", both create: the API server accepts one, the other gets 409
    kube_api.rendezvous("POST", SECRETS_PATH, parties=2)
    results = _race(kube_api)
    assert kube_api.count("POST", SECRETS_PATH) == 2
    assert sorted(r.secret_action for r in results) == ["adopted", "created"]
    data = assert_converged(kube_api)
    for r in results:
        assert r.bundle.cert_pem == data["tls.crt"]
        assert r.bundle.ca_cert_pem == data["ca.crt"]


def test_two_replicas_racing_to_renew_agree_on_the_winner(kube_api, api):
    t0 = dt.datetime.now(dt.UTC)
    run(api, days=90, now=t0)
    later = t0 + dt.timedelta(days=70)
    kube_api.rendezvous("PUT", SECRET_PATH, parties=2)
    results = _race(kube_api, days=90, now=later)
    assert kube_api.count("PUT", SECRET_PATH) == 2
    assert sorted(r.secret_action for r in results) == ["renewed-leaf", "reused"]
    data = assert_converged(kube_api)
    assert {r.bundle.cert_pem for r in results} == {data["tls.crt"]}


def test_webhook_config_edited_during_patch_is_retried(kube_api, api):
    """A concurrent edit (e.g. kubectl apply) between our read and our patch: 409, retry."""
    fired = False

    async def edit_first_patch(request: web.Request) -> web.StreamResponse | None:
        nonlocal fired
        if request.method == "PATCH" and request.path == MWC_PATH and not fired:
            fired = True
            mwc = kube_api.get(MWC_PATH)
            mwc["metadata"].setdefault("labels", {})["edited"] = "yes"
            kube_api.put(MWC_PATH, mwc)
        return None

    kube_api.add_hook(edit_first_patch)
    result = run(api)
    assert result.ca_bundle_patched
    assert kube_api.count("PATCH", MWC_PATH) == 2
    assert kube_api.get(MWC_PATH)["metadata"]["labels"] == {"edited": "yes"}
    assert_converged(kube_api)


def test_install_cli_with_kubeconfig(kube_api, api, tmp_path: Path, monkeypatch, capsys):
    _kubeconfig(tmp_path, kube_api.url, monkeypatch)
    argv = ["install", "--service", SVC, "--namespace", NS, "--secret", SECRET]
    argv += ["--webhook-config", MWC, "--cert-dir", str(tmp_path / "tls")]
    assert main(argv) == 0
    assert '"secret": "created"' in capsys.readouterr().out
    assert (tmp_path / "tls" / "tls.key").exists()
    assert_converged(kube_api)
    assert main([*argv[:-4], "--webhook-config", "missing"]) == 1
    assert "not found" in capsys.readouterr().err


def _kubeconfig(tmp_path: Path, server: str, monkeypatch) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "local", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))


CLI_ARGS = [
    "install",
    "--service",
    SVC,
    "--namespace",
    NS,
    "--secret",
    SECRET,
    "--webhook-config",
    MWC,
]


def test_install_cli_forbidden_is_one_clear_line(kube_api, api, tmp_path, monkeypatch, capsys):
    async def forbid_secrets(request: web.Request) -> web.StreamResponse | None:
        if "/secrets" in request.path:
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "Forbidden",
                    "code": 403,
                    "message": 'secrets "modelcache-webhook-tls" is forbidden: no RBAC',
                },
                status=403,
            )
        return None

    kube_api.add_hook(forbid_secrets)
    _kubeconfig(tmp_path, kube_api.url, monkeypatch)
    assert main(CLI_ARGS) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        'error: Kubernetes API: 403 Forbidden: secrets "modelcache-webhook-tls" is forbidden: '
        "no RBAC"
    )


def test_install_cli_unreachable_api_fails_cleanly(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        _kubeconfig(tmp_path, f"http://127.0.0.1:{s.getsockname()[1]}", monkeypatch)
        assert main(CLI_ARGS) == 1
    assert "cannot reach the Kubernetes API" in capsys.readouterr().err


def test_two_install_processes_racing_end_with_one_secret(kube_api, api, tmp_path, monkeypatch):
    """Two replicas' init containers are two processes: same outcome as with threads."""
    import subprocess
    import sys

    _kubeconfig(tmp_path, kube_api.url, monkeypatch)
    kube_api.rendezvous("POST", SECRETS_PATH, parties=2)
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "certs", *CLI_ARGS, "--cert-dir", str(tmp_path / f"tls{i}")],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(yaml.safe_load(out)["secret"] for out, _ in outs) == ["adopted", "created"]
    assert kube_api.count("POST", SECRETS_PATH) == 2
    data = assert_converged(kube_api)
    for i in range(2):
        assert (tmp_path / f"tls{i}" / "tls.crt").read_bytes() == data["tls.crt"]
        assert (tmp_path / f"tls{i}" / "tls.key").read_bytes() == data["tls.key"]
