"""``manifests/agent/``: schema-valid, least privilege, and consistent with the agent's CLI."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
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


# ---- components/peers: peer fetch between nodes ------------------------------------------------

PEERS_DIR = AGENT_DIR.parent / "components" / "peers"


def with_peers() -> list[dict[str, Any]]:
    from tests.fixtures.kustomize import _apply_component

    return _apply_component(PEERS_DIR, load_resources())


def _argv(container: dict[str, Any]) -> list[str]:
    """The container's command line as the kubelet runs it ($(VAR) expanded)."""
    raw = container["command"][3:] + container.get("args", [])
    return [a.replace("$(NODE_NAME)", "node-1").replace("$(POD_IP)", "10.0.0.7") for a in raw]


@pytest.mark.parametrize("doc", with_peers(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_peers_component_objects_are_schema_valid(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_peers_one_server_per_node_in_the_agent_both_processes_fetch_through_peers() -> None:
    from sidecar.node.peers import CA_CERT_FILE, CA_KEY_FILE, parse_listen

    [ds] = [d for d in with_peers() if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    agent, csi = _container(pod, "agent"), _container(pod, "csi")
    a = build_parser().parse_args(_argv(agent))
    c = build_parser().parse_args(_argv(csi))
    # the agent (unprivileged) serves; the privileged plugin opens no port
    host, port = parse_listen(a.peer_listen)
    assert host == "0.0.0.0"
    assert a.peer_advertise == "10.0.0.7"
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert {"name": "peer", "containerPort": port, "protocol": "TCP"} in agent["ports"]
    assert c.peer_listen is None and c.peer_advertise is None
    assert "ports" not in csi
    # both read the agents' CA (and issue their own certificates from its key)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for args, container in ((a, agent), (c, csi)):
        assert args.peer_tls_dir == "/etc/modelcache/peer-tls"
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == args.peer_tls_dir]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "modelcache-agents-ca"
        assert {i["path"] for i in secret["items"]} == {CA_CERT_FILE, CA_KEY_FILE}
        assert secret["defaultMode"] == 0o400
    # the rest of both command lines is what the base install runs
    base = {c["name"]: c for c in _base_daemonset()["spec"]["template"]["spec"]["containers"]}
    assert agent["args"][: len(base["agent"]["args"])] == base["agent"]["args"]
    assert csi["command"][: len(base["csi"]["command"])] == base["csi"]["command"]


def _base_daemonset() -> dict[str, Any]:
    [ds] = by_kind("DaemonSet")
    return ds


def test_peers_rbac_adds_list_on_nodes_only() -> None:
    objs = with_peers()
    rules = [
        (r["resources"], r["verbs"])
        for o in objs
        if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "modelcache-agent-peers"
        for r in o["rules"]
    ]
    assert rules == [(["nodes"], ["list"])]
    bound = {b["roleRef"]["name"]: b["subjects"] for b in objs if b["kind"] == "ClusterRoleBinding"}
    assert bound["modelcache-agent-peers"] == bound["modelcache-agent"]
    granted = {
        (res, verb)
        for o in objs
        if o["kind"] in ("ClusterRole", "Role")
        for r in o["rules"]
        for res in r["resources"]
        for verb in r["verbs"]
    }
    assert not any(res in ("secrets", "pods") for res, _ in granted)  # the CA is a volume
    assert ("nodes", "watch") not in granted


def test_peers_network_policy_lets_only_agents_reach_the_peer_port() -> None:
    objs = with_peers()
    [policy] = [o for o in objs if o["kind"] == "NetworkPolicy"]
    [ds] = [d for d in objs if d["kind"] == "DaemonSet"]
    agent_labels = ds["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= agent_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    peer_rule, metrics_rule = spec["ingress"]
    assert peer_rule["ports"] == [{"port": "peer", "protocol": "TCP"}]
    [source] = peer_rule["from"]
    assert source == {"podSelector": {"matchLabels": spec["podSelector"]["matchLabels"]}}
    assert metrics_rule == {"ports": [{"port": "metrics", "protocol": "TCP"}]}  # as before
    named = {
        p["name"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
    }
    assert {"peer", "metrics"} <= named


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_peers_component_builds_with_kubectl_kustomize(tmp_path: Path) -> None:
    """An overlay of manifests/agent with the component, built by kustomize itself, gives
    the DaemonSet and objects the test renderer gives."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(AGENT_DIR.parent, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}/agent\ncomponents:\n  - {rel}/components/peers\n"
    )
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    theirs = [o for o in yaml.safe_load_all(out) if o]
    ours = with_peers()
    assert sorted((o["kind"], o["metadata"]["name"]) for o in theirs) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in ours
    )
    [their_ds] = [o for o in theirs if o["kind"] == "DaemonSet"]
    [our_ds] = [o for o in ours if o["kind"] == "DaemonSet"]
    assert their_ds["spec"] == our_ds["spec"]


DRAGONFLY_DIR = AGENT_DIR.parent / "components" / "dragonfly"


def test_dragonfly_component_gives_both_fetchers_the_daemon_socket() -> None:
    from tests.fixtures.kustomize import _apply_component

    objs = _apply_component(DRAGONFLY_DIR, load_resources())
    [ds] = [d for d in objs if d["kind"] == "DaemonSet"]
    kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    pod = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in ("agent", "csi"):
        container = _container(pod, name)
        args = build_parser().parse_args(_argv(container))
        socket = Path(args.dragonfly_socket)
        assert socket.is_absolute()
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(socket.parent)]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["hostPath"] == {
            "path": str(socket.parent),
            "type": "Directory",
        }
        assert args.peer_tls_dir is None  # Dragonfly alone: no peers


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_peers_and_dragonfly_components_compose_with_kubectl_kustomize(tmp_path: Path) -> None:
    from tests.fixtures.kustomize import _apply_component

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(AGENT_DIR.parent, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}/agent\ncomponents:\n  - {rel}/components/peers\n"
        f"  - {rel}/components/dragonfly\n"
    )
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    [their_ds] = [o for o in yaml.safe_load_all(out) if o and o["kind"] == "DaemonSet"]
    ours = _apply_component(DRAGONFLY_DIR, with_peers())
    [our_ds] = [o for o in ours if o["kind"] == "DaemonSet"]
    assert their_ds["spec"] == our_ds["spec"]
    pod = our_ds["spec"]["template"]["spec"]
    csi = build_parser().parse_args(_argv(_container(pod, "csi")))
    assert csi.peer_tls_dir and csi.dragonfly_socket  # wrap_source picks one per model
