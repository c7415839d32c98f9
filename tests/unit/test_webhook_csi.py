"""``nodeCache: csi`` (the default): the CSI pod shape, the credentials the node side gets,
and the pods that must be left alone because the node side could not serve them."""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import pytest
import yaml

from sidecar.layout import APP_CACHE_ROOT
from tests.fixtures.podcheck import assert_pod_ok
from tests.fixtures.podsecurity import added_violations
from webhook.config import Config, ConfigError, load_config
from webhook.inject import run_inject
from webhook.mutations.credentials import NODE_CREDENTIAL_ENV, SCHEME_CREDENTIAL_ENV
from webhook.pipeline import mutate_pod

CSI = Config()
HOSTPATH = Config(node_cache="hostPath")
VLLM = "vllm/vllm-openai:v0.8.5"
RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
    "readOnlyRootFilesystem": True,
}


def pod(*containers: dict[str, Any], **ann: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "annotations": {f"modelcache.io/{k.replace('_', '-')}": v for k, v in ann.items()},
        },
        "spec": {"containers": list(containers)},
    }


def vllm(model: str = "org/m", **kw: Any) -> dict[str, Any]:
    return {"name": "vllm", "image": VLLM, "command": ["vllm", "serve", model], **kw}


def secret_env(var: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def inject(p: dict[str, Any], config: Config = CSI) -> tuple[dict[str, Any], Any]:
    out, result = mutate_pod(copy.deepcopy(p), namespace="ml", config=config)
    return out, result


def volumes(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in out["spec"]["volumes"]}


def containers(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = out["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


# --- the pod shape ------------------------------------------------------------------------------


def test_path_delivery_pod_shape() -> None:
    out, result = inject(pod(vllm("s3://bkt/llama/"), warmup_timeout="90"))
    assert result.decision == "injected", result.reason
    vols = volumes(out)
    models = "llama=s3://bkt/llama/"
    assert vols["modelcache-models"] == {
        "name": "modelcache-models",
        "csi": {
            "driver": "csi.modelcache.io",
            "readOnly": True,
            "volumeAttributes": {"kind": "view", "models": models},
        },
    }
    assert vols["modelcache-fuse"]["csi"]["volumeAttributes"] == {"kind": "fuse", "models": models}
    assert vols["modelcache-fuse-socket"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    assert not [v for v in vols.values() if "hostPath" in v]
    assert "modelcache-hub" not in vols  # path delivery only
    c = containers(out)
    assert c["modelcache-warmup"]["command"] == [
        "python",
        "-m",
        "sidecar",
        "warmup",
        "--node-socket",
        "/var/run/modelcache/node/socket",
        "--model",
        models,
        "--timeout",
        "90",
        "--on-failure",
        "fail",
    ]
    assert c["modelcache-warmup"]["volumeMounts"] == [
        {"name": "modelcache-fuse-socket", "mountPath": "/var/run/modelcache/node"}
    ]
    side = c["modelcache-sidecar"]
    assert side["command"] == [
        "python",
        "-m",
        "sidecar",
        "mount",
        "--node-socket",
        "/var/run/modelcache/node/socket",
        "--mountpoint",
        "/var/run/modelcache/mnt",
        "--link-root",
        APP_CACHE_ROOT,
        "--model",
        models,
        "--on-failure",
        "fail",
    ]
    assert side["volumeMounts"] == [
        {"name": "modelcache-fuse", "mountPath": "/var/run/modelcache/mnt", "readOnly": True},
        {"name": "modelcache-fuse-socket", "mountPath": "/var/run/modelcache/node"},
        {"name": "modelcache-models", "mountPath": APP_CACHE_ROOT, "readOnly": True},
    ]
    for name in ("modelcache-warmup", "modelcache-sidecar"):
        assert c[name]["securityContext"] == RESTRICTED
        assert "env" not in c[name] and "envFrom" not in c[name]
    assert c["vllm"]["volumeMounts"] == [
        {"name": "modelcache-fuse", "mountPath": "/models", "readOnly": True},
        {"name": "modelcache-models", "mountPath": APP_CACHE_ROOT, "readOnly": True},
    ]
    assert not any("mountPropagation" in m for x in c.values() for m in x.get("volumeMounts", []))
    assert result.warnings == [w for w in result.warnings if "privileged" not in w]
    assert_pod_ok(out)
    assert added_violations(pod(vllm("s3://bkt/llama/")), out) == []


def test_hub_cache_pod_shape() -> None:
    out, _ = inject(pod(vllm(), warmup="async"))
    c = containers(out)
    assert "modelcache-warmup" not in c
    assert c["vllm"]["volumeMounts"][:2] == [
        {"name": "modelcache-fuse", "mountPath": "/var/run/modelcache/view", "readOnly": True},
        {"name": "modelcache-models", "mountPath": APP_CACHE_ROOT, "readOnly": True},
    ]
    side = c["modelcache-sidecar"]
    assert side["command"][-6:] == [
        "--hub-cache",
        "/var/run/modelcache/hub",
        "--hub-link-root",
        "/var/run/modelcache/view",
        "--on-failure",
        "continue",
    ]
    assert "--warmup" not in side["command"]  # the node side fetches
    assert {"name": "modelcache-hub", "mountPath": "/var/run/modelcache/hub"} in side[
        "volumeMounts"
    ]
    assert volumes(out)["modelcache-hub"] == {"name": "modelcache-hub", "emptyDir": {}}


def test_include_globs_reach_the_node_side_and_the_sidecar() -> None:
    out, _ = inject(pod(vllm(), warmup_include="*.json,*.safetensors"))
    for name in ("modelcache-models", "modelcache-fuse"):
        attrs = volumes(out)[name]["csi"]["volumeAttributes"]
        assert attrs["include"] == "*.json,*.safetensors"
    side = containers(out)["modelcache-sidecar"]["command"]
    assert side[side.index("--include") + 1] == "*.json,*.safetensors"
    assert "--include" not in containers(out)["modelcache-warmup"]["command"]


def test_the_single_gguf_of_llama_cpp_hf_is_the_include() -> None:
    llama = {
        "name": "llama",
        "image": "ghcr.io/ggml-org/llama.cpp:server",
        "args": ["-hf", "bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q8_0", "--port", "8080"],
    }
    out, result = inject(pod(llama))
    assert result.decision == "injected", result.reason
    attrs = volumes(out)["modelcache-models"]["csi"]["volumeAttributes"]
    assert attrs["include"] == "*[Qq]8_0*.gguf"
    assert json.loads(out["metadata"]["annotations"]["modelcache.io/status"])["include"] == [
        "*[Qq]8_0*.gguf"
    ]


def test_status_records_the_mode_and_readmission_is_a_no_op() -> None:
    out, _ = inject(pod(vllm()))
    assert json.loads(out["metadata"]["annotations"]["modelcache.io/status"])["nodeCache"] == "csi"
    again, result = inject(out)
    assert result.decision == "unchanged" and again == out


def test_a_pod_injected_in_the_other_mode_is_denied() -> None:
    legacy, _ = inject(pod(vllm()), HOSTPATH)
    _, result = inject(legacy, CSI)
    assert not result.allowed
    assert "nodeCache hostPath" in (result.message or "")
    modern, _ = inject(pod(vllm()), CSI)
    _, result = inject(modern, HOSTPATH)
    assert not result.allowed and "nodeCache csi" in (result.message or "")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v["csi"]["volumeAttributes"].update(models="m=hf://victim/private"),
        lambda v: v["csi"].update(nodePublishSecretRef={"name": "someone-elses"}),
        lambda v: v.update(csi={**v["csi"], "driver": "other.example.com"}),
    ],
)
def test_a_forged_csi_volume_is_denied(tamper: Any) -> None:
    out, _ = inject(pod(vllm()))
    forged = copy.deepcopy(out)
    tamper(next(v for v in forged["spec"]["volumes"] if v["name"] == "modelcache-models"))
    _, result = inject(forged)
    assert not result.allowed and "modelcache-models" in (result.message or "")


def test_an_app_container_cannot_mount_our_views_where_it_was_not_given_them() -> None:
    out, _ = inject(pod(vllm()))
    forged = copy.deepcopy(out)
    forged["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "modelcache-fuse-socket", "mountPath": "/steal"}
    )
    _, result = inject(forged)
    assert not result.allowed and "/steal" in (result.message or "")


def test_pvc_sources_are_left_alone_in_csi_mode() -> None:
    out, result = inject(pod(vllm(), model="m=pvc://claim/x"))
    assert result.decision == "skipped"
    assert "pvc://" in result.reason and "hostPath" in result.reason
    assert out["metadata"]["annotations"]["modelcache.io/skipped"] == result.reason
    _, legacy = inject(pod(vllm(), model="m=pvc://claim/x"), HOSTPATH)
    assert legacy.decision == "injected"


# --- credentials ----------------------------------------------------------------------------


def _csi(out: dict[str, Any]) -> list[dict[str, Any]]:
    return [volumes(out)[n]["csi"] for n in ("modelcache-models", "modelcache-fuse")]


CREDENTIAL_CASES: list[tuple[str, dict[str, Any], str, str | None, str | None]] = [
    # (id, app container fields, model, secret the node gets, credentialKeys)
    ("none", {}, "org/m", None, None),
    ("same-key", {"env": [secret_env("HF_TOKEN", "hf", "HF_TOKEN")]}, "org/m", "hf", None),
    (
        "other-key",
        {"env": [secret_env("HF_TOKEN", "hf", "token")]},
        "org/m",
        "hf",
        "HF_TOKEN=token",
    ),
    (
        "old-name",
        {"env": [secret_env("HUGGING_FACE_HUB_TOKEN", "hf", "t")]},
        "org/m",
        "hf",
        "HUGGING_FACE_HUB_TOKEN=t",
    ),
    ("envfrom", {"envFrom": [{"secretRef": {"name": "all"}}]}, "org/m", "all", None),
    (
        "envfrom-prefix",
        {"envFrom": [{"secretRef": {"name": "all"}, "prefix": "HF_"}]},
        "org/m",
        "all",
        "HF_TOKEN=TOKEN",
    ),
    (
        "explicit-beats-envfrom",
        {
            "env": [secret_env("HF_TOKEN", "hf", "t")],
            "envFrom": [{"secretRef": {"name": "app-config"}}],
        },
        "org/m",
        "hf",
        "HF_TOKEN=t",
    ),
    (
        "s3-keys",
        {
            "env": [
                secret_env("AWS_ACCESS_KEY_ID", "aws", "id"),
                secret_env("AWS_SECRET_ACCESS_KEY", "aws", "secret"),
                {"name": "AWS_REGION", "value": "eu-west-1"},
            ]
        },
        "s3://bkt/m/",
        "aws",
        "AWS_ACCESS_KEY_ID=id,AWS_SECRET_ACCESS_KEY=secret",
    ),
    (
        "other-scheme-ignored",
        {"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "AKIA..."}]},
        "org/m",
        None,
        None,
    ),
    ("empty-literal", {"env": [{"name": "HF_TOKEN", "value": ""}]}, "org/m", None, None),
    (
        "config-map-elsewhere",
        {"envFrom": [{"configMapRef": {"name": "settings"}}]},
        "org/m",
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("fields", "model", "secret", "keys"),
    [c[1:] for c in CREDENTIAL_CASES],
    ids=[c[0] for c in CREDENTIAL_CASES],
)
def test_the_node_side_gets_the_apps_one_secret(
    fields: dict[str, Any], model: str, secret: str | None, keys: str | None
) -> None:
    out, result = inject(pod(vllm(model, **fields)))
    assert result.decision == "injected", result.reason
    for csi in _csi(out):
        assert csi.get("nodePublishSecretRef") == ({"name": secret} if secret else None)
        assert csi["volumeAttributes"].get("credentialKeys") == keys
    for c in containers(out).values():
        if c["name"].startswith("modelcache-"):
            assert "env" not in c and "envFrom" not in c
    assert added_violations(pod(vllm(model, **fields)), out) == []


SKIP_CASES: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    (
        "literal",
        {"env": [{"name": "HF_TOKEN", "value": "hf_abc"}]},
        "org/m",
        ("HF_TOKEN", "literal value", "Secret"),
    ),
    (
        "config-map",
        {
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
            ]
        },
        "org/m",
        ("HF_TOKEN", "configMapKeyRef"),
    ),
    (
        "two-secrets",
        {
            "env": [
                secret_env("AWS_ACCESS_KEY_ID", "aws-id", "id"),
                secret_env("AWS_SECRET_ACCESS_KEY", "aws-secret", "secret"),
            ]
        },
        "s3://bkt/m/",
        ("2 Secrets", "aws-id", "aws-secret", "AWS_ACCESS_KEY_ID", "one Secret"),
    ),
    (
        "two-envfrom-secrets",
        {"envFrom": [{"secretRef": {"name": "a"}}, {"secretRef": {"name": "b"}}]},
        "org/m",
        ("2 Secrets", "a: envFrom", "b: envFrom"),
    ),
    (
        "optional-secret-key-ref",
        {
            "env": [
                {
                    "name": "HF_TOKEN",
                    "valueFrom": {
                        "secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}
                    },
                }
            ]
        },
        "org/m",
        ("HF_TOKEN", "hf-token", "optional: true", "exist"),
    ),
    (
        "optional-envfrom-secret",
        {"envFrom": [{"secretRef": {"name": "maybe", "optional": True}}]},
        "org/m",
        ("Secret maybe", "optional: true"),
    ),
    (
        "gcs-not-taken-yet",
        {"env": [secret_env("GCS_ACCESS_KEY_ID", "gcs", "id")]},
        "gs://bkt/m/",
        ("GCS_ACCESS_KEY_ID", "cannot use"),
    ),
]


@pytest.mark.parametrize(
    ("fields", "model", "words"), [c[1:] for c in SKIP_CASES], ids=[c[0] for c in SKIP_CASES]
)
def test_credentials_the_node_side_cannot_receive_leave_the_pod_alone(
    fields: dict[str, Any], model: str, words: tuple[str, ...]
) -> None:
    p = pod(vllm(model, **fields))
    out, result = inject(p)
    assert result.decision == "skipped"
    for word in words:
        assert word in result.reason, (word, result.reason)
    assert out["spec"] == p["spec"]
    assert out["metadata"]["annotations"]["modelcache.io/skipped"] == result.reason
    assert len(result.reason) <= 200  # it also goes into a warning
    # the legacy shape copies the app's env into its own containers instead
    _, legacy = inject(p, HOSTPATH)
    assert legacy.decision == "injected"


def test_the_fallback_secret_is_used_only_without_app_credentials() -> None:
    cfg = Config(fallback_credentials_secret="modelcache-hf")
    out, _ = inject(pod(vllm()), cfg)
    assert all(c["nodePublishSecretRef"] == {"name": "modelcache-hf"} for c in _csi(out))
    out, _ = inject(pod(vllm(env=[secret_env("HF_TOKEN", "mine", "HF_TOKEN")])), cfg)
    assert all(c["nodePublishSecretRef"] == {"name": "mine"} for c in _csi(out))


def test_endpoints_never_come_from_the_pod() -> None:
    endpoint = {"name": "HF_ENDPOINT", "value": "http://attacker.example"}
    out, _ = inject(pod(vllm(env=[endpoint, secret_env("HF_TOKEN", "hf", "HF_TOKEN")])))
    for csi in _csi(out):
        assert "HF_ENDPOINT" not in json.dumps(csi)
    assert all("env" not in c for n, c in containers(out).items() if n.startswith("modelcache-"))


def test_the_names_the_webhook_sends_are_the_ones_the_plugin_takes() -> None:
    from sidecar.node.flags import DRIVER_NAME
    from sidecar.node.publish import CREDENTIAL_KEYS
    from webhook.mutations.context import CSI_DRIVER

    assert CSI_DRIVER == DRIVER_NAME
    assert set(NODE_CREDENTIAL_ENV) == set(CREDENTIAL_KEYS)
    for names in SCHEME_CREDENTIAL_ENV.values():
        assert names  # every scheme with credentials lists them


@pytest.mark.parametrize(
    "p",
    [
        pod(vllm("s3://bkt/llama/", env=[secret_env("AWS_ACCESS_KEY_ID", "aws", "id")])),
        pod(vllm(), warmup_include="*.json,*.safetensors", warmup="async"),
        pod(vllm(), model="base=hf://org/m@v2,lora=hf://org/adapter"),
    ],
    ids=["s3-credential-keys", "include", "two-models"],
)
def test_the_plugin_parses_every_volume_the_webhook_emits(p: dict[str, Any]) -> None:
    """Each csi volume, with what the kubelet adds, goes through the plugin's own parser."""
    from sidecar.node.publish import EPHEMERAL_KEY, POD_UID_KEY, parse_volume_context

    out, result = inject(p)
    assert result.decision == "injected", result.reason
    status = json.loads(out["metadata"]["annotations"]["modelcache.io/status"])
    for name, kind in (("modelcache-models", "view"), ("modelcache-fuse", "fuse")):
        attrs = volumes(out)[name]["csi"]["volumeAttributes"]
        spec = parse_volume_context(
            {**attrs, EPHEMERAL_KEY: "true", POD_UID_KEY: "0f0e0d0c-0b0a-4908-8706-050403020100"}
        )
        assert spec.kind == kind
        assert [m.to_arg() for m in spec.models] == [
            f"{m['name']}={m['uri']}" for m in status["models"]
        ]
        assert list(spec.include) == status["include"]
        if "credentialKeys" in attrs:
            assert ("AWS_ACCESS_KEY_ID", "id") in spec.credential_keys


# --- config and inject ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodeCache: fuse\n", "nodeCache"),
        ("fallbackCredentialsSecret: Not_A_Name\n", "fallbackCredentialsSecret"),
    ],
)
def test_bad_config_values_are_named(tmp_path: Any, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_csi_is_the_default_and_hostpath_is_a_setting(tmp_path: Any) -> None:
    assert Config().node_cache == "csi"
    path = tmp_path / "c.yaml"
    path.write_text("nodeCache: hostPath\nfallbackCredentialsSecret: hf-token\n")
    cfg = load_config(str(path))
    assert (cfg.node_cache, cfg.fallback_credentials_secret) == ("hostPath", "hf-token")


NAMESPACED = """
apiVersion: v1
kind: Namespace
metadata:
  name: strict
  labels: {pod-security.kubernetes.io/enforce: restricted}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: strict}
spec:
  containers:
  - {name: vllm, image: vllm/vllm-openai:v0.8.5, command: [vllm, serve, org/m]}
"""


@pytest.mark.parametrize(("config", "injected"), [(CSI, True), (HOSTPATH, False)])
def test_podsecurity_namespaces_are_skipped_only_for_the_privileged_shape(
    config: Config, injected: bool
) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_inject(io.StringIO(NAMESPACED), out, err, config) == 0
    pod_out = list(yaml.safe_load_all(out.getvalue()))[1]
    labels = pod_out["metadata"].get("labels") or {}
    assert (labels.get("modelcache.io/injected") == "true") is injected
    assert ("enforces PodSecurity restricted" in err.getvalue()) is not injected
