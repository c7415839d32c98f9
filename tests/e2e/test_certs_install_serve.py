"""From `certs install` to a served TLS handshake, as the API server would do it.

The pair that `certs install --cert-dir` writes is served by the real `python -m webhook serve`
started with the Deployment's own args and ConfigMap, and verified the way the API server
verifies it: trusting only the caBundle that install patched into the webhook configuration,
by the Service's DNS name. A renewal written into the same directory is picked up without a
restart.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import sys
import time
from pathlib import Path

import pytest

from certs.install import install
from tests.fixtures.kustomize import render

ROOT = Path(__file__).resolve().parents[2]
NS = "modelcache-system"
SVC_DNS = "modelcache-webhook.modelcache-system.svc"
MWC_PATH = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/modelcache-webhook"


@pytest.fixture
def objects():
    return render(ROOT / "manifests")


def _seed_webhook_config(kube_api, objects) -> None:
    mwc = next(o for o in objects if o["kind"] == "MutatingWebhookConfiguration")
    kube_api.put(MWC_PATH, mwc)


def _server_argv(objects, tmp_path: Path, tls_dir: Path) -> list[str]:
    """The Deployment's container args, with its mount paths mapped into tmp_path."""
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config = next(o for o in objects if o["kind"] == "ConfigMap")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(config["data"]["config.yaml"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    local = {"tls": tls_dir, "config": tmp_path / "config"}
    argv = []
    for arg in container["args"]:
        if arg.startswith("--port="):
            argv += ["--port=0", "--host=127.0.0.1"]
            continue
        mapped = arg
        for mount_path, name in mounts.items():
            if name in local and f"={mount_path}/" in mapped:
                mapped = mapped.replace(f"={mount_path}/", f"={local[name]}/")
        argv.append(mapped)
    return [sys.executable, "-m", "webhook", *argv]


async def _handshake(port: int, ca_pem: bytes, path: str) -> tuple[bytes, bytes]:
    """(peer certificate DER, first response line) for GET path, verified like the API server."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=SVC_DNS
    )
    try:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {SVC_DNS}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return peer, status.strip()


def _der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


async def test_installed_pair_serves_and_renewal_is_picked_up(kube_api, objects, tmp_path):
    _seed_webhook_config(kube_api, objects)
    tls_dir = tmp_path / "tls"
    common = {
        "service": "modelcache-webhook",
        "namespace": NS,
        "secret": "modelcache-webhook-tls",
        "webhook_config": "modelcache-webhook",
        "cert_dir": tls_dir,
    }

    def run_install(**extra):
        with kube_api.api_client() as api:
            return install(api, **common, **extra)

    first = await asyncio.to_thread(run_install)
    ca_bundle = base64.b64decode(kube_api.get(MWC_PATH)["webhooks"][0]["clientConfig"]["caBundle"])
    assert ca_bundle == first.ca_bundle_pem

    proc = await asyncio.create_subprocess_exec(
        *_server_argv(objects, tmp_path, tls_dir),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.startswith(b"serving on https://127.0.0.1:"), line
        port = int(line.rsplit(b":", 1)[1])

        peer, status = await _handshake(port, ca_bundle, "/healthz")
        assert peer == _der(first.bundle.cert_pem)
        assert status == b"HTTP/1.1 200 OK"
        _, status = await _handshake(port, ca_bundle, "/readyz")
        assert status == b"HTTP/1.1 200 OK"

        # a new name forces a new leaf under the same CA; the server reloads it in place
        second = await asyncio.to_thread(run_install, dns=["webhook.example.internal"])
        assert second.secret_action == "renewed-leaf"
        assert second.ca_bundle_pem == ca_bundle
        deadline = time.monotonic() + 30
        while True:
            peer, status = await _handshake(port, ca_bundle, "/healthz")
            if peer == _der(second.bundle.cert_pem):
                break
            assert time.monotonic() < deadline, "server never picked up the renewed pair"
            await asyncio.sleep(0.2)  # polling a condition with a deadline, not synchronising
        assert status == b"HTTP/1.1 200 OK"
        assert proc.returncode is None
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
