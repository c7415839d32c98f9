"""The loopback Kubernetes API stand-in keeps the promises other tests rely on.

Driven through the real kubernetes client, as the code under test drives it.
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

NS = "team"


@pytest.fixture
def core(kube_api):
    with kube_api.api_client() as api:
        yield k8s.CoreV1Api(api)


def _secret(name: str, **meta) -> k8s.V1Secret:
    return k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name, **meta), data={"k": "dg=="})


def test_create_get_and_already_exists(core):
    created = core.create_namespaced_secret(NS, _secret("s"))
    assert created.metadata.resource_version
    assert created.metadata.namespace == NS
    assert core.read_namespaced_secret("s", NS).data == {"k": "dg=="}
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, _secret("s"))
    assert exc.value.status == 409 and "AlreadyExists" in exc.value.body
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_secret("missing", NS)
    assert exc.value.status == 404


def test_replace_with_stale_resource_version_conflicts(core):
    first = core.create_namespaced_secret(NS, _secret("s"))
    body = _secret("s", resource_version=first.metadata.resource_version)
    second = core.replace_namespaced_secret("s", NS, body)
    assert second.metadata.resource_version != first.metadata.resource_version
    assert second.metadata.uid == first.metadata.uid
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_secret("s", NS, body)  # still carries the old version
    assert exc.value.status == 409 and "Conflict" in exc.value.body


def test_json_patch_test_failure_and_stale_version(kube_api, core):
    core.create_namespaced_secret(NS, _secret("s"))
    path = f"/api/v1/namespaces/{NS}/secrets/s"
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_secret("s", NS, [{"op": "test", "path": "/data/k", "value": "x"}])
    assert exc.value.status == 422
    stale = [{"op": "replace", "path": "/metadata/resourceVersion", "value": "0"}]
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_secret("s", NS, stale)
    assert exc.value.status == 409
    ok = [{"op": "add", "path": "/data/j", "value": "dw=="}]
    core.patch_namespaced_secret("s", NS, ok)
    assert kube_api.get(path)["data"] == {"k": "dg==", "j": "dw=="}


def test_object_patch_is_a_merge(kube_api, core):
    core.create_namespaced_secret(NS, _secret("s", labels={"a": "1", "b": "2"}))
    core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"a": None, "c": "3"}}})
    labels = kube_api.get(f"/api/v1/namespaces/{NS}/secrets/s")["metadata"]["labels"]
    assert labels == {"b": "2", "c": "3"}


def test_list_with_label_selector_and_cluster_scoped_objects(kube_api, core):
    core.create_namespaced_secret(NS, _secret("a", labels={"tier": "x"}))
    core.create_namespaced_secret(NS, _secret("b", labels={"tier": "y"}))
    core.create_namespaced_secret("other", _secret("c", labels={"tier": "x"}))
    names = [
        s.metadata.name for s in core.list_namespaced_secret(NS, label_selector="tier=x").items
    ]
    assert names == ["a"]
    kube_api.put(
        "/api/v1/nodes/n1", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}
    )
    core.patch_node("n1", {"metadata": {"labels": {"cache.modelcache.io/k": "ready"}}})
    assert core.read_node("n1").metadata.labels == {"cache.modelcache.io/k": "ready"}
    assert ("PATCH", "/api/v1/nodes/n1") in kube_api.requests
