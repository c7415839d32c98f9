"""manifests/: schema-valid, least privilege, and selecting exactly the pods that docs/design.md
("Opting in and out") names."""

from __future__ import annotations

import copy
import itertools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from certs.issue import service_dns_names
from tests.fixtures.kustomize import load_yaml_docs, object_id, render
from webhook.config import DEFAULT_SIDECAR_IMAGE, load_config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
NS = "modelcache-system"
# The schema versions we promise: matchConditions are GA from 1.30; and the newest known.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# cert-manager's kinds are CRDs: no schema ships with kubernetes-validate, so they get the
# structural check in test_cert_manager_objects_are_well_formed instead.
CRD_GROUPS = {"cert-manager.io/v1"}
# The optional node agent (manifests/agent) is owned and tested by its own suite.
OWN_DIRS = ["core", "components", "overlays"]
RENDERED = {
    "default": MANIFESTS,
    "fail-closed": MANIFESTS / "overlays" / "fail-closed",
    "cert-manager": MANIFESTS / "overlays" / "cert-manager",
    "events": MANIFESTS / "overlays" / "events",
    "node-cache-hostpath": MANIFESTS / "overlays" / "node-cache-hostpath",
}


def _resource_files() -> list[Path]:
    """Every YAML file that holds Kubernetes objects (not kustomizations, not JSON patches)."""
    out = []
    for d in OWN_DIRS:
        for p in sorted((MANIFESTS / d).rglob("*.yaml")):
            if p.name == "kustomization.yaml":
                continue
            docs = list(yaml.safe_load_all(p.read_text()))
            if all(isinstance(doc, dict) and "kind" in doc for doc in docs):
                out.append(p)
    return out


def _by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = _by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered_once() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in RENDERED.items()}


@pytest.fixture
def rendered(rendered_once) -> dict[str, list[dict[str, Any]]]:
    """A private copy per test, so a test that edits an object cannot leak into another."""
    return copy.deepcopy(rendered_once)


def _validate(obj: dict[str, Any], version: str) -> None:
    if obj["apiVersion"] in CRD_GROUPS:
        return  # structural check elsewhere (no schema for CRDs)
    kubernetes_validate.validate(obj, version, strict=True)


# ---- schema --------------------------------------------------------------------------------
def test_resource_files_found():
    names = {p.relative_to(MANIFESTS).as_posix() for p in _resource_files()}
    assert "core/deployment.yaml" in names
    assert "core/mutatingwebhookconfiguration.yaml" in names
    assert "components/certs-install/rbac.yaml" in names
    assert "overlays/cert-manager/certificates.yaml" in names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "path", _resource_files(), ids=lambda p: p.relative_to(MANIFESTS).as_posix()
)
def test_every_resource_file_is_schema_valid_in_strict_mode(path, version):
    for doc in load_yaml_docs(path):
        _validate(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(RENDERED))
def test_every_rendered_object_is_schema_valid_in_strict_mode(rendered, name, version):
    assert rendered[name]
    for obj in rendered[name]:
        _validate(obj, version)


def test_strict_validation_would_catch_a_typo(rendered):
    """Guard against a validator that accepts anything."""
    deployment = _one(rendered["default"], "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("name", list(RENDERED))
def test_renderer_agrees_with_kubectl_kustomize(rendered, name):
    out = subprocess.run(
        ["kubectl", "kustomize", str(RENDERED[name])],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    theirs = {object_id(o): o for o in yaml.safe_load_all(out) if o}
    ours = {object_id(o): o for o in rendered[name]}
    assert ours == theirs


# ---- what the default install contains -----------------------------------------------------
def test_default_install_objects(rendered):
    kinds = sorted(o["kind"] for o in rendered["default"])
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "MutatingWebhookConfiguration",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
        ]
    )
    assert _one(rendered["default"], "Namespace")["metadata"]["name"] == NS
    for o in rendered["default"]:
        if o["kind"] not in (
            "Namespace",
            "MutatingWebhookConfiguration",
            "ClusterRole",
            "ClusterRoleBinding",
        ):
            assert o["metadata"]["namespace"] == NS, object_id(o)


def _pod_spec(objs):
    return _one(objs, "Deployment")["spec"]["template"]["spec"]


def test_deployment_is_highly_available(rendered):
    d = _one(rendered["default"], "Deployment")
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    anti = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    pdb = _one(rendered["default"], "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == d["spec"]["selector"]


@pytest.mark.parametrize("name", list(RENDERED))
def test_every_container_is_locked_down(rendered, name):
    spec = _pod_spec(rendered[name])
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert isinstance(pod_sc["runAsUser"], int) and pod_sc["runAsUser"] > 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = spec["containers"] + spec.get("initContainers", [])
    assert containers
    for c in containers:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc.get("privileged", False) is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
        assert "hostPath" not in str(spec.get("volumes"))


def test_probes_and_service_use_the_https_port(rendered):
    spec = _pod_spec(rendered["default"])
    server = spec["containers"][0]
    port = next(p for p in server["ports"] if p["name"] == "https")
    assert f"--port={port['containerPort']}" in server["args"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = server[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == (path, "https", "HTTPS")
    svc = _one(rendered["default"], "Service")
    assert svc["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}
    ]
    assert (
        svc["spec"]["selector"]
        == _one(rendered["default"], "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_server_args_match_mounted_files(rendered):
    spec = _pod_spec(rendered["default"])
    server = spec["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert "--tls-cert=" + mounts["tls"] + "/tls.crt" in server["args"]
    assert "--tls-key=" + mounts["tls"] + "/tls.key" in server["args"]
    assert "--config=" + mounts["config"] + "/config.yaml" in server["args"]
    volumes = {v["name"] for v in spec["volumes"]}
    for c in spec["containers"] + spec["initContainers"]:
        assert {m["name"] for m in c["volumeMounts"]} <= volumes


def test_certs_install_init_container_matches_the_objects(rendered):
    objs = rendered["default"]
    init = _pod_spec(objs)["initContainers"]
    assert [c["name"] for c in init] == ["certs-install"]
    args = dict(a.removeprefix("--").split("=", 1) for a in init[0]["args"][1:])
    assert init[0]["command"] == ["python", "-m", "certs"] and init[0]["args"][0] == "install"
    assert args["service"] == _one(objs, "Service")["metadata"]["name"]
    assert args["namespace"] == NS
    assert args["webhook-config"] == _one(objs, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert args["cert-dir"] == next(
        m["mountPath"] for m in init[0]["volumeMounts"] if m["name"] == "tls"
    )
    role = _one(objs, "Role")
    assert args["secret"] in role["rules"][0]["resourceNames"]
    # only the init container holds API credentials; the network-facing server holds none
    spec = _pod_spec(objs)
    assert spec["automountServiceAccountToken"] is False
    token_volumes = {
        v["name"]
        for v in spec["volumes"]
        if any("serviceAccountToken" in src for src in v.get("projected", {}).get("sources", []))
    }
    assert token_volumes == {"kube-api-access"}
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert {"name": "kube-api-access", "mountPath": sa_dir, "readOnly": True} in init[0][
        "volumeMounts"
    ]
    for c in spec["containers"]:
        assert all(m["name"] not in token_volumes for m in c["volumeMounts"]), c["name"]
    cluster_role = _one(objs, "ClusterRole")
    assert cluster_role["rules"][0]["resourceNames"] == [args["webhook-config"]]


def test_rbac_is_least_privilege(rendered):
    objs = rendered["default"]
    role = _one(objs, "Role")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["modelcache-webhook-tls"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    assert _one(objs, "ClusterRole")["rules"] == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["modelcache-webhook"],
            "verbs": ["get", "patch"],
        }
    ]
    sa = _one(objs, "ServiceAccount")["metadata"]["name"]
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        assert _one(objs, kind)["subjects"] == [
            {"kind": "ServiceAccount", "name": sa, "namespace": NS}
        ]
    assert _pod_spec(objs)["serviceAccountName"] == sa


def test_config_map_is_a_valid_webhook_config_naming_the_release_images(rendered, tmp_path):
    cm = _one(rendered["default"], "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    config = load_config(str(path))
    assert config.sidecar_image == DEFAULT_SIDECAR_IMAGE
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    assert config.sidecar_image.endswith(":" + version.group(1))
    images = {
        c["image"]
        for c in _pod_spec(rendered["default"])["containers"]
        + _pod_spec(rendered["default"])["initContainers"]
    }
    assert images == {f"ghcr.io/modelcache/webhook:{version.group(1)}"}
    mwc = _one(rendered["default"], "MutatingWebhookConfiguration")
    for hook in mwc["webhooks"]:
        excluded = next(
            e
            for e in hook["namespaceSelector"]["matchExpressions"]
            if e["key"] == "kubernetes.io/metadata.name"
        )
        assert sorted(excluded["values"]) == sorted(config.excluded_namespaces)


# ---- the webhook configuration --------------------------------------------------------------
def test_webhook_settings_are_as_designed(rendered):
    mwc = _one(rendered["default"], "MutatingWebhookConfiguration")
    svc = _one(rendered["default"], "Service")
    assert [h["name"] for h in mwc["webhooks"]] == [
        "namespace.inject.modelcache.io",
        "pod.inject.modelcache.io",
    ]
    for hook in mwc["webhooks"]:
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] <= 5
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["failurePolicy"] == "Ignore"
        assert hook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert hook["clientConfig"]["service"] == {
            "name": svc["metadata"]["name"],
            "namespace": NS,
            "path": "/mutate",
            "port": 443,
        }
        assert "caBundle" not in hook["clientConfig"]  # so `kubectl apply` never resets it


def test_fail_closed_overlay_changes_only_the_failure_policy(rendered):
    default = {object_id(o): o for o in rendered["default"]}
    closed = {object_id(o): o for o in rendered["fail-closed"]}
    assert default.keys() == closed.keys()
    for oid, obj in closed.items():
        if obj["kind"] == "MutatingWebhookConfiguration":
            assert [h["failurePolicy"] for h in obj["webhooks"]] == ["Fail", "Fail"]
            for h in obj["webhooks"]:
                h["failurePolicy"] = "Ignore"
        assert obj == default[oid]


# Every CEL expression the manifests use, with its meaning in Python. An expression not in
# this table fails the test: change both together.
NOT_OPTED_OUT = (
    "!has(object.metadata.labels) || "
    "!('modelcache.io/inject' in object.metadata.labels) || "
    "object.metadata.labels['modelcache.io/inject'] != 'false'"
)
CEL = {
    NOT_OPTED_OUT: lambda obj: (
        not obj["metadata"].get("labels")
        or "modelcache.io/inject" not in obj["metadata"]["labels"]
        or obj["metadata"]["labels"]["modelcache.io/inject"] != "false"
    ),
}


def _selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (an absent key satisfies NotIn / DoesNotExist)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _calls(mwc: dict[str, Any], namespace: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """Which webhooks the API server would call for creating ``pod`` in ``namespace``."""
    called = []
    for hook in mwc["webhooks"]:
        if not any("CREATE" in r["operations"] and "pods" in r["resources"] for r in hook["rules"]):
            continue
        if not _selector_matches(hook.get("namespaceSelector"), namespace["metadata"]["labels"]):
            continue
        if not _selector_matches(hook.get("objectSelector"), pod["metadata"].get("labels") or {}):
            continue
        conditions = [" ".join(c["expression"].split()) for c in hook.get("matchConditions", [])]
        for expression in conditions:
            assert expression in CEL, f"no evaluator for CEL expression {expression!r}"
        if all(CEL[e](pod) for e in conditions):
            called.append(hook["name"])
    return called


def _namespace(name: str, label: str | None, pss: str | None = None) -> dict[str, Any]:
    # the API server always sets kubernetes.io/metadata.name
    labels = {"kubernetes.io/metadata.name": name}
    if label is not None:
        labels["modelcache.io/injection"] = label
    if pss is not None:
        labels["pod-security.kubernetes.io/enforce"] = pss
    return {"metadata": {"name": name, "labels": labels}}


NAMESPACES = [
    ("ml", "enabled"),
    ("plain", None),
    ("off", "disabled"),
    ("kube-system", "enabled"),
    ("kube-node-lease", "enabled"),
    ("modelcache-system", "enabled"),
    ("kube-system", None),
    ("modelcache-system", None),
    ("strict", "enabled", "restricted"),
    ("base", "enabled", "baseline"),
    ("loose", "enabled", "privileged"),
    ("plainbase", None, "baseline"),
]
POD_LABELS: list[dict[str, str] | None] = [
    None,
    {},
    {"app": "vllm"},
    {"modelcache.io/inject": "true"},
    {"modelcache.io/inject": "false"},
    {"modelcache.io/inject": "false", "app": "vllm"},
    {"modelcache.io/inject": "yes"},
]


def _designed(
    ns_name: str,
    ns_label: str | None,
    pod_labels: dict[str, str] | None,
    pss: str | None = None,
    *,
    hostpath: bool = False,
) -> bool:
    """docs/install.md, 'Opt-in and opt-out', written as plainly as possible. With the
    default nodeCache csi, PodSecurity levels do not matter (what is added meets
    restricted); the legacy hostPath shape skips namespaces enforcing baseline/restricted."""
    if ns_name in ("modelcache-system", "kube-system", "kube-node-lease"):
        return False
    if hostpath and pss in ("baseline", "restricted"):
        return False
    inject = (pod_labels or {}).get("modelcache.io/inject")
    if inject == "false":
        return False
    return ns_label == "enabled" or inject == "true"


@pytest.mark.parametrize("name", ["default", "fail-closed", "cert-manager", "node-cache-hostpath"])
@pytest.mark.parametrize(("ns", "pod_labels"), list(itertools.product(NAMESPACES, POD_LABELS)))
def test_selection_is_exactly_the_design(rendered, name, ns, pod_labels):
    mwc = _one(rendered[name], "MutatingWebhookConfiguration")
    pod: dict[str, Any] = {"metadata": {"generateName": "server-"}}
    if pod_labels is not None:
        pod["metadata"]["labels"] = pod_labels
    calls = _calls(mwc, _namespace(*ns), pod)
    assert len(calls) <= 1, f"pod reaches {calls}: it would be mutated twice"
    hostpath = name == "node-cache-hostpath"
    assert bool(calls) is _designed(*ns[:2], pod_labels, *ns[2:], hostpath=hostpath)


def test_node_cache_hostpath_overlay_changes_only_the_mode_and_the_podsecurity_skip(
    rendered, tmp_path
):
    default = {object_id(o): o for o in rendered["default"]}
    legacy = {object_id(o): o for o in rendered["node-cache-hostpath"]}
    assert default.keys() == legacy.keys()
    configs = {}
    for name, objs in (("default", default), ("legacy", legacy)):
        cm = next(o for o in objs.values() if o["kind"] == "ConfigMap")
        path = tmp_path / f"{name}.yaml"
        path.write_text(cm["data"]["config.yaml"])
        configs[name] = load_config(str(path))
    assert configs["default"].node_cache == "csi"
    assert configs["legacy"].node_cache == "hostPath"
    assert configs["legacy"].model_copy(update={"node_cache": "csi"}) == configs["default"]
    for oid, obj in legacy.items():
        if obj["kind"] == "ConfigMap":
            continue
        if obj["kind"] == "MutatingWebhookConfiguration":
            for hook in obj["webhooks"]:
                last = hook["namespaceSelector"]["matchExpressions"].pop()
                assert last == {
                    "key": "pod-security.kubernetes.io/enforce",
                    "operator": "NotIn",
                    "values": ["baseline", "restricted"],
                }
        assert obj == default[oid]


def test_selection_spot_checks(rendered):
    """The same rules, named, so a reader sees which webhook takes which pod."""
    mwc = _one(rendered["default"], "MutatingWebhookConfiguration")
    pod_true = {"metadata": {"labels": {"modelcache.io/inject": "true"}}}
    assert _calls(mwc, _namespace("ml", "enabled"), {"metadata": {}}) == [
        "namespace.inject.modelcache.io"
    ]
    assert _calls(mwc, _namespace("ml", "enabled"), pod_true) == ["namespace.inject.modelcache.io"]
    assert _calls(mwc, _namespace("plain", None), pod_true) == ["pod.inject.modelcache.io"]
    assert _calls(mwc, _namespace("kube-system", "enabled"), pod_true) == []


def test_match_condition_alone_excludes_opt_out(rendered):
    """Even with the objectSelector dropped (an old API server or a hand edit), CEL skips it."""
    mwc = _one(rendered["default"], "MutatingWebhookConfiguration")
    for hook in mwc["webhooks"]:
        hook.pop("objectSelector")
    pod_false = {"metadata": {"labels": {"modelcache.io/inject": "false"}}}
    assert _calls(mwc, _namespace("ml", "enabled"), pod_false) == []


# ---- cert-manager overlay ---------------------------------------------------------------------
def test_cert_manager_overlay_replaces_the_bootstrap(rendered):
    objs = rendered["cert-manager"]
    assert not [
        o for o in objs if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    spec = _pod_spec(objs)
    assert "initContainers" not in spec
    assert spec["automountServiceAccountToken"] is False
    tls = next(v for v in spec["volumes"] if v["name"] == "tls")
    cert = next(o for o in objs if o["kind"] == "Certificate" and not o["spec"].get("isCA"))
    assert tls == {
        "name": "tls",
        "secret": {"secretName": cert["spec"]["secretName"], "defaultMode": 0o440},
    }
    mwc = _one(objs, "MutatingWebhookConfiguration")
    ref = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert ref == f"{cert['metadata']['namespace']}/{cert['metadata']['name']}"


def test_cert_manager_objects_are_well_formed(rendered):
    """No schema for cert-manager CRDs here: check the fields cert-manager v1 requires."""
    objs = {
        (o["kind"], o["metadata"]["name"]): o
        for o in rendered["cert-manager"]
        if o["apiVersion"] == "cert-manager.io/v1"
    }
    assert set(objs) == {
        ("Issuer", "modelcache-selfsigned"),
        ("Issuer", "modelcache-ca"),
        ("Certificate", "modelcache-ca"),
        ("Certificate", "modelcache-webhook-tls"),
    }
    for o in objs.values():
        assert o["metadata"]["namespace"] == NS
        assert set(o) == {"apiVersion", "kind", "metadata", "spec"}
    assert objs["Issuer", "modelcache-selfsigned"]["spec"] == {"selfSigned": {}}
    ca_issuer = objs["Issuer", "modelcache-ca"]["spec"]
    ca_cert = objs["Certificate", "modelcache-ca"]["spec"]
    serving = objs["Certificate", "modelcache-webhook-tls"]["spec"]
    assert ca_cert["isCA"] is True
    assert ca_issuer == {"ca": {"secretName": ca_cert["secretName"]}}
    assert ca_cert["issuerRef"] == {
        "name": "modelcache-selfsigned",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    assert serving["issuerRef"] == {
        "name": "modelcache-ca",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    assert serving["dnsNames"] == service_dns_names("modelcache-webhook", NS)
    assert "server auth" in serving["usages"]
    for spec in (ca_cert, serving):
        assert set(spec) <= {
            "isCA",
            "commonName",
            "secretName",
            "duration",
            "renewBefore",
            "dnsNames",
            "usages",
            "privateKey",
            "issuerRef",
        }
        assert spec["privateKey"]["algorithm"] == "ECDSA"
        hours = [int(spec[k].removesuffix("h")) for k in ("duration", "renewBefore")]
        assert hours[1] * 3 == hours[0]  # renew at a third left, like `certs install`


# ---- the renderer refuses what it does not implement ----------------------------------------
def _kustomization(tmp_path: Path, body: dict[str, Any], files: dict[str, Any]) -> Path:
    for name, content in files.items():
        (tmp_path / name).write_text(
            yaml.safe_dump_all(content) if isinstance(content, list) else yaml.safe_dump(content)
        )
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(body))
    return tmp_path


CM = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "c", "namespace": "n"},
    "data": {"a": "1"},
}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"resources": ["cm.yaml"], "namespace": "x"}, "unsupported fields \\['namespace'\\]"),
        (
            {
                "resources": ["cm.yaml"],
                "patches": [{"target": {"kind": "ConfigMap"}, "patch": "data:\n  a: '2'\n"}],
            },
            "only JSON 6902",
        ),
        (
            {"resources": ["cm.yaml"], "patches": [{"target": {"kind": "Secret"}, "patch": "[]"}]},
            "matches no resource",
        ),
        (
            {
                "resources": ["cm.yaml"],
                "patches": [
                    {
                        "target": {"kind": "ConfigMap"},
                        "patch": "- {op: test, path: /data/a, value: '9'}",
                    }
                ],
            },
            "failed",
        ),
        ({"resources": ["cm.yaml", "cm.yaml"]}, "defined twice"),
        ({"resources": ["missing.yaml"]}, "does not exist"),
    ],
)
def test_renderer_refuses_what_it_does_not_implement(tmp_path, body, message):
    from tests.fixtures.kustomize import KustomizeError

    with pytest.raises(KustomizeError, match=message):
        render(_kustomization(tmp_path, body, {"cm.yaml": CM}))


def test_renderer_applies_json_patches_to_the_target_only(tmp_path):
    other = copy.deepcopy(CM)
    other["metadata"]["name"] = "d"
    body = {
        "resources": ["cm.yaml"],
        "patches": [
            {
                "target": {"kind": "ConfigMap", "name": "c"},
                "patch": "- {op: replace, path: /data/a, value: '2'}",
            }
        ],
    }
    objs = render(_kustomization(tmp_path, body, {"cm.yaml": [CM, other]}))
    assert [o["data"]["a"] for o in objs] == ["2", "1"]


def test_events_overlay_lets_the_server_create_events_and_nothing_else(rendered):
    objs = rendered["events"]
    role = next(
        o
        for o in objs
        if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "modelcache-webhook-events"
    )
    assert {v for r in role["rules"] for v in r["verbs"]} == {"create", "patch"}
    assert {res for r in role["rules"] for res in r["resources"]} == {"events"}
    server = next(c for c in _pod_spec(objs)["containers"] if c["name"] == "webhook")
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts["/var/run/secrets/kubernetes.io/serviceaccount"]["readOnly"] is True
    assert _pod_spec(rendered["default"])["automountServiceAccountToken"] is False
    default_server = next(
        c for c in _pod_spec(rendered["default"])["containers"] if c["name"] == "webhook"
    )
    assert all(
        m["mountPath"] != "/var/run/secrets/kubernetes.io/serviceaccount"
        for m in default_server.get("volumeMounts", [])
    ), "the default install keeps the server without API credentials"
