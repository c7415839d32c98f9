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
    "CSIDriver",
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
    container = _container(pod, "agent")
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


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in pod["containers"] if c["name"] == name]
    return found


def test_csidriver_is_inline_only_with_pod_info_and_no_attach() -> None:
    from sidecar.node.flags import DRIVER_NAME

    [driver] = by_kind("CSIDriver")
    assert driver["metadata"]["name"] == DRIVER_NAME
    assert driver["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "volumeLifecycleModes": ["Ephemeral"],
        "fsGroupPolicy": "None",
    }


def test_driver_name_is_the_one_the_plugin_and_the_webhook_use() -> None:
    """The CSIDriver, the registrar's socket path, the webhook's volumes and the plugin's
    GetPluginInfo all say the same name."""
    from sidecar.node.flags import DRIVER_NAME
    from webhook.mutations.context import CSI_DRIVER

    assert CSI_DRIVER == DRIVER_NAME
    [ds] = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    registrar = _container(pod, "node-driver-registrar")
    assert (
        f"--kubelet-registration-path=/var/lib/kubelet/plugins/{DRIVER_NAME}/csi.sock"
        in registrar["args"]
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["plugin-dir"]["hostPath"]["path"] == f"/var/lib/kubelet/plugins/{DRIVER_NAME}"


def test_csi_plugin_container_matches_its_cli_and_the_kubelet_layout() -> None:
    from webhook.config import DEFAULT_CACHE_HOST_PATH

    [ds] = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    csi = _container(pod, "csi")
    registrar = _container(pod, "node-driver-registrar")
    argv = [a.replace("$(NODE_NAME)", "node-1") for a in csi["command"][3:] + csi.get("args", [])]
    args = build_parser().parse_args(argv)
    assert args.role == "csi"
    assert args.node_id == "node-1"
    assert args.cache_dir == CONTAINER_CACHE_DIR
    assert args.kubelet_root == "/var/lib/kubelet"
    env = {e["name"]: e for e in csi["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in csi["volumeMounts"]}
    # the plugin's socket is in the directory the registrar shares and registers
    assert args.csi_endpoint == "unix:///csi/csi.sock"
    assert mounts["/csi"]["name"] == "plugin-dir"
    assert "--csi-address=/csi/csi.sock" in registrar["args"]
    assert {m["mountPath"]: m["name"] for m in registrar["volumeMounts"]}["/csi"] == "plugin-dir"
    assert volumes[{m["mountPath"]: m["name"] for m in registrar["volumeMounts"]}["/registration"]][
        "hostPath"
    ]["path"] == ("/var/lib/kubelet/plugins_registry")
    # its mounts reach the kubelet and the pods; it holds the same cache as the agent
    pods = mounts["/var/lib/kubelet/pods"]
    assert pods["mountPropagation"] == "Bidirectional"
    assert volumes[pods["name"]]["hostPath"]["path"] == "/var/lib/kubelet/pods"
    cache = volumes[mounts[args.cache_dir]["name"]]
    assert cache["hostPath"] == {"path": DEFAULT_CACHE_HOST_PATH, "type": "DirectoryOrCreate"}
    assert volumes[mounts["/dev"]["name"]]["hostPath"]["path"] == "/dev"
    # Bidirectional propagation is allowed only in privileged containers
    assert csi["securityContext"]["privileged"] is True
    assert registrar["securityContext"]["allowPrivilegeEscalation"] is False
    assert registrar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert registrar["image"].startswith("registry.k8s.io/sig-storage/csi-node-driver-registrar:")


def test_the_plugin_gets_no_api_rights_of_its_own() -> None:
    """The plugin runs under the agent's ServiceAccount and needs nothing more: the kubelet
    hands it the pod's identity and Secret with each publish."""
    [ds] = by_kind("DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "modelcache-agent"
    assert {d["metadata"]["name"] for d in by_kind("ServiceAccount")} == {"modelcache-agent"}
    rules = [r for kind in ("ClusterRole", "Role") for d in by_kind(kind) for r in d["rules"]]
    assert not any("secrets" in r["resources"] or "pods" in r["resources"] for r in rules)


def test_shipped_prewarm_config_parses() -> None:
    [configmap] = by_kind("ConfigMap")
    for name, text in configmap["data"].items():
        parse_prewarm_config(text, name)
