"""``manifests/agent/``: schema-valid, least privilege, and consistent with the agent's CLI."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sidecar.__main__ import build_parser
from sidecar.layout import CONTAINER_CACHE_DIR
from sidecar.prewarm import parse_prewarm_config

AGENT_DIR = Path(__file__).resolve().parents[2] / "manifests" / "agent"
K8S_VERSION = "1.30"
CLUSTER_SCOPED = (
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)


def load_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((AGENT_DIR / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((AGENT_DIR / name).read_text()) if d)
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in load_resources() if d["kind"] == kind]


def test_every_file_is_listed() -> None:
    kustomization = yaml.safe_load((AGENT_DIR / "kustomization.yaml").read_text())
    on_disk = {p.name for p in AGENT_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


@pytest.mark.parametrize(
    "doc", load_resources(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_schema_strict(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_namespace_is_the_webhook_namespace() -> None:
    from webhook.config import WEBHOOK_NAMESPACE

    kustomization = yaml.safe_load((AGENT_DIR / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == WEBHOOK_NAMESPACE
    for doc in load_resources():
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == WEBHOOK_NAMESPACE, doc["kind"]
        for subject in doc.get("subjects", []):
            assert subject == {
                "kind": "ServiceAccount",
                "name": "modelcache-agent",
                "namespace": WEBHOOK_NAMESPACE,
            }


def test_rbac_is_get_patch_nodes_and_its_configmap_only() -> None:
    [cluster_role] = by_kind("ClusterRole")
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}
    ]
    [role] = by_kind("Role")
    [configmap] = by_kind("ConfigMap")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [configmap["metadata"]["name"]],
            "verbs": ["get"],
        }
    ]
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in by_kind("ClusterRoleBinding")}
    bound |= {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in by_kind("RoleBinding")}
    assert bound == {("ClusterRole", "modelcache-agent"), ("Role", "modelcache-agent")}


def test_daemonset_runs_the_agent_cli_on_the_webhooks_cache() -> None:
    from webhook.config import DEFAULT_CACHE_HOST_PATH

    [ds] = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["serviceAccountName"] == by_kind("ServiceAccount")[0]["metadata"]["name"]
    assert container["command"][:3] == ["python", "-m", "sidecar"]
    # the kubelet expands $(VAR) from the container's env in command and args
    argv = [
        a.replace("$(NODE_NAME)", "node-1") for a in container["command"][3:] + container["args"]
    ]
    args = build_parser().parse_args(argv)
    assert args.role == "agent"
    assert args.node == "node-1"
    assert args.cache_dir == CONTAINER_CACHE_DIR
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    cache = volumes[mounts[args.cache_dir]]
    assert cache["hostPath"] == {"path": DEFAULT_CACHE_HOST_PATH, "type": "DirectoryOrCreate"}
    config_dir = str(Path(args.prewarm_config).parent)
    [configmap] = by_kind("ConfigMap")
    assert volumes[mounts[config_dir]]["configMap"]["name"] == configmap["metadata"]["name"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert args.metrics_port in ports

    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in security
    assert security["readOnlyRootFilesystem"] is True
    assert shlex.join(container["command"])  # an exec array, not a shell string


def test_shipped_prewarm_config_parses() -> None:
    [configmap] = by_kind("ConfigMap")
    for name, text in configmap["data"].items():
        parse_prewarm_config(text, name)
