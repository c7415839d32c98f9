"""Fault injection, validation and no-op patches of the API stand-in work for any resource.

The node agent's tests use them on nodes; these check them on Secrets, through the real
kubernetes client, so the features are the server's and not the node layer's.
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from tests.fixtures.kube_api import DROPPED, KubeApiServer

NS = "team"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"


@pytest.fixture
def core(kube_api: KubeApiServer):
    with kube_api.api_client() as api:
        yield k8s.CoreV1Api(api)


def _secret(name: str, labels: dict[str, str] | None = None) -> k8s.V1Secret:
    return k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name, labels=labels), data={"k": "dg=="})


def test_faults_are_queued_per_method_and_path(kube_api: KubeApiServer, core) -> None:
    kube_api.fail_next(1, "429", method="POST", path=SECRETS)
    kube_api.fail_next(1, "drop", method="GET")
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, _secret("s"))
    assert exc.value.status == 429 and "TooManyRequests" in exc.value.body
    assert kube_api.get(f"{SECRETS}/s") is None
    core.create_namespaced_secret(NS, _secret("s"))  # the fault was used up
    with pytest.raises(HTTPError):
        core.read_namespaced_secret("s", NS)
    assert core.read_namespaced_secret("s", NS).data == {"k": "dg=="}
    assert [(r.method, r.status) for r in kube_api.recorded()] == [
        ("POST", 429),
        ("POST", 201),
        ("GET", DROPPED),
        ("GET", 200),
    ]
    with pytest.raises(ValueError, match="unknown fault kind 'teapot'"):
        kube_api.fail_next(1, "teapot")


def test_bad_labels_are_invalid_on_every_write(kube_api: KubeApiServer, core) -> None:
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, _secret("s", {"a/b/c": "v"}))
    assert exc.value.status == 422 and "invalid label key" in exc.value.body
    assert kube_api.get(f"{SECRETS}/s") is None
    core.create_namespaced_secret(NS, _secret("s", {"ok": "v"}))
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"ok": "not valid!"}}})
    assert exc.value.status == 422 and "invalid label value" in exc.value.body
    assert kube_api.get(f"{SECRETS}/s")["metadata"]["labels"] == {"ok": "v"}


def test_a_patch_that_changes_nothing_keeps_the_version(kube_api: KubeApiServer, core) -> None:
    version = core.create_namespaced_secret(NS, _secret("s", {"a": "1"})).metadata.resource_version
    same = core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"a": "1"}}})
    assert same.metadata.resource_version == version
    changed = core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"a": "2"}}})
    assert changed.metadata.resource_version != version


def test_on_request_sees_each_request_before_its_answer(kube_api: KubeApiServer, core) -> None:
    seen: list[tuple[str, bool]] = []
    kube_api.on_request.append(
        lambda r: seen.append((r.method, kube_api.get(f"{SECRETS}/s") is not None))
    )
    core.create_namespaced_secret(NS, _secret("s"))
    core.delete_namespaced_secret("s", NS)
    assert seen == [("POST", False), ("DELETE", True)]
