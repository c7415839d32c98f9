"""Each mutation on its own: parametrized tables, and ``f(f(pod)) == f(pod)`` for every one."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest

from sidecar.layout import APP_CACHE_ROOT, CONTAINER_CACHE_DIR
from tests.fixtures.podcheck import assert_pod_ok
from tests.fixtures.podsecurity import added_violations
from webhook.config import Config
from webhook.mutations.affinity import add_affinity
from webhook.mutations.containers import inject_containers
from webhook.mutations.context import Context, Notes
from webhook.mutations.rewrite import rewrite_model_args
from webhook.mutations.status import read_status, write_status
from webhook.mutations.volumes import add_volumes, mount_app_containers, pvc_volume_name
from webhook.pipeline import MUTATIONS, mutate_pod, plan_pod

CFG = Config()
#: the legacy pod shape (privileged sidecar, hostPath cache)
HOSTPATH = Config(node_cache="hostPath")
VLLM = "vllm/vllm-openai:v0.8.5"
S3_ENV = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
]


def pod(
    *containers: dict[str, Any], init: list[dict[str, Any]] | None = None, **ann: str
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": list(containers)}
    if init is not None:
        spec["initContainers"] = init
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "annotations": {f"modelcache.io/{k.replace('_', '-')}": v for k, v in ann.items()},
        },
        "spec": spec,
    }


def vllm(model: str = "org/m", name: str = "vllm", **kw: Any) -> dict[str, Any]:
    return {"name": name, "image": VLLM, "command": ["vllm", "serve", model], **kw}


def plan(p: dict[str, Any], config: Config = CFG) -> Context:
    ctx = plan_pod(copy.deepcopy(p), namespace="ns", config=config)
    assert isinstance(ctx, Context), ctx
    return ctx


def apply(fn: Any, p: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return fn(copy.deepcopy(p), dataclasses.replace(ctx, notes=Notes()))  # type: ignore[no-any-return]


POD_SHAPES = {
    "vllm": pod(vllm()),
    "classic-async": pod(vllm(), warmup="async", sidecar="classic"),
    "off-pvc": pod(vllm(), warmup="off", model="pvc://claim/sub/dir"),  # hostPath only
    "secret-keys": pod(
        vllm(env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}}])
    ),
    "list-s3": pod(vllm(), model="a=hf://org/m,b=s3://bkt/lora", warmup_include="*.json"),
    "require": pod(vllm(), affinity="require"),
    "mesh": pod(
        vllm(), init=[{"name": "istio-init", "image": "i"}, {"name": "user", "image": "u"}]
    ),
    "sh-c": pod({"name": "s", "image": VLLM, "command": ["sh", "-c", "vllm serve org/m --port 1"]}),
}


def _config(shape: str) -> Config:
    """pvc:// sources are served only by the legacy shape (the CSI driver does not yet)."""
    return HOSTPATH if shape == "off-pvc" else CFG


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[n for n, _ in MUTATIONS])
@pytest.mark.parametrize("shape", POD_SHAPES, ids=list(POD_SHAPES))
def test_every_mutation_is_idempotent(mutation: Any, shape: str) -> None:
    _, fn = mutation
    p = POD_SHAPES[shape]
    ctx = plan(p, _config(shape))
    once = apply(fn, p, ctx)
    twice = apply(fn, once, ctx)
    assert twice == once


@pytest.mark.parametrize("shape", POD_SHAPES, ids=list(POD_SHAPES))
def test_pipeline_output_valid_and_idempotent(shape: str) -> None:
    p = POD_SHAPES[shape]
    before = copy.deepcopy(p)
    cfg = _config(shape)
    out, result = mutate_pod(p, namespace="ns", config=cfg)
    assert p == before, "the input was changed"
    assert result.decision == "injected"
    assert result.patch
    assert_pod_ok(out)
    if cfg.node_cache == "csi":
        assert added_violations(p, out) == []
    again, second = mutate_pod(out, namespace="ns", config=cfg)
    assert second.decision == "unchanged"
    assert second.patch == []
    assert again == out


# --- volumes ---------------------------------------------------------------------------------


def test_volumes_and_app_mounts_hostpath() -> None:
    p = pod(vllm(), model="a=hf://org/m,c=pvc://claim/x", rewrite="path")
    ctx = plan(p, HOSTPATH)
    out = mount_app_containers(add_volumes(copy.deepcopy(p), ctx), ctx)
    vols = {v["name"]: v for v in out["spec"]["volumes"]}
    assert vols["modelcache-cache"]["hostPath"] == {
        "path": "/var/lib/modelcache",
        "type": "DirectoryOrCreate",
    }
    assert vols["modelcache-mnt"] == {"name": "modelcache-mnt", "emptyDir": {}}
    assert vols["modelcache-pvc-claim"]["persistentVolumeClaim"] == {
        "claimName": "claim",
        "readOnly": True,
    }
    mounts = out["spec"]["containers"][0]["volumeMounts"]
    assert mounts[0] == {
        "name": "modelcache-mnt",
        "mountPath": "/models",
        "readOnly": True,
        "mountPropagation": "HostToContainer",
    }
    keys = [m.source.cache_key for m in ctx.named_models]
    assert mounts[1:] == [
        {
            "name": "modelcache-cache",
            "mountPath": f"{APP_CACHE_ROOT}/{k}",
            "subPath": f"models/{k}/data",
            "readOnly": True,
        }
        for k in keys
    ]


@pytest.mark.parametrize(
    ("kind", "item"),
    [
        ("volumes", {"name": "modelcache-cache", "hostPath": {"path": "/"}}),
        ("initContainers", {"name": "modelcache-sidecar", "image": "evil", "command": ["sh"]}),
        ("containers", {"name": "modelcache-warmup", "image": "evil"}),
    ],
)
def test_a_reserved_name_modelcache_did_not_inject_is_denied(
    kind: str, item: dict[str, Any]
) -> None:
    """A user container named modelcache-sidecar once got privileged: true and root."""
    p = pod(vllm())
    p["spec"].setdefault(kind, []).append(item)
    _, result = mutate_pod(p, namespace="ns", config=CFG)
    assert not result.allowed
    assert item["name"] in (result.message or "") and "reserved" in (result.message or "")


def test_an_app_container_cannot_mount_the_node_cache_itself() -> None:
    """Mounting modelcache-cache without a subPath would expose every tenant's models."""
    grab = {"name": "modelcache-cache", "mountPath": "/steal"}
    p = pod(vllm(volumeMounts=[grab]))
    _, result = mutate_pod(p, namespace="ns", config=CFG)
    assert not result.allowed and "modelcache-cache" in (result.message or "")
    out, _ = mutate_pod(pod(vllm(), vllm("org/x", name="other")), namespace="ns", config=CFG)
    forged = copy.deepcopy(out)
    forged["spec"]["containers"][0]["volumeMounts"].append(grab)
    _, result = mutate_pod(forged, namespace="ns", config=CFG)
    assert not result.allowed and "/steal" in (result.message or "")


def test_a_forged_container_beside_a_real_status_is_denied() -> None:
    out, _ = mutate_pod(pod(vllm()), namespace="ns", config=CFG)
    forged = copy.deepcopy(out)
    forged["spec"]["initContainers"][1]["image"] = "attacker/image"
    _, result = mutate_pod(forged, namespace="ns", config=CFG)
    assert not result.allowed and "image" in (result.message or "")
    forged = copy.deepcopy(out)
    forged["spec"]["initContainers"][1].setdefault("env", []).append(
        {"name": "HF_ENDPOINT", "value": "x"}
    )
    _, result = mutate_pod(forged, namespace="ns", config=CFG)
    assert not result.allowed and "HF_ENDPOINT" in (result.message or "")
    # what other webhooks add to every container (resources, unrelated env) is kept
    other = copy.deepcopy(out)
    other["spec"]["initContainers"][1].setdefault("env", []).append(
        {"name": "DD_ENV", "value": "prod"}
    )
    other["spec"]["initContainers"][1]["resources"] = {"limits": {"cpu": "1"}}
    _, result = mutate_pod(other, namespace="ns", config=CFG)
    assert result.allowed and result.patch == []


@pytest.mark.parametrize(
    ("claim", "length"), [("short", 20), ("c" * 60, 63), ("a.b-" + "x" * 240, 63)]
)
def test_pvc_volume_name_fits_63(claim: str, length: int) -> None:
    name = pvc_volume_name(claim)
    assert len(name) == length
    assert name.startswith("modelcache-pvc-")
    assert pvc_volume_name(claim) == name
    if len(claim) > 48:
        assert pvc_volume_name(claim + "y") != name


# --- containers ------------------------------------------------------------------------------


def _inject(p: dict[str, Any], config: Config = CFG) -> tuple[dict[str, Any], Context]:
    ctx = plan(p, config)
    return inject_containers(copy.deepcopy(p), ctx), ctx


def test_warmup_and_native_sidecar_commands_hostpath() -> None:
    out, ctx = _inject(
        pod(
            vllm(),
            model="m=pvc://claim/x",
            warmup_include="*.json,*.safetensors",
            warmup_timeout="90",
        ),
        HOSTPATH,
    )
    warm, side = out["spec"]["initContainers"]
    assert warm["command"] == [
        "python",
        "-m",
        "sidecar",
        "warmup",
        "--cache-dir",
        CONTAINER_CACHE_DIR,
        "--model",
        "m=pvc://claim/x",
        "--timeout",
        "90",
        "--on-failure",
        "fail",
        "--include",
        "*.json,*.safetensors",
        "--pvc-root",
        "/var/run/modelcache/pvc",
    ]
    assert side["command"] == [
        "python",
        "-m",
        "sidecar",
        "mount",
        "--cache-dir",
        CONTAINER_CACHE_DIR,
        "--mountpoint",
        "/var/run/modelcache/mnt",
        "--link-root",
        APP_CACHE_ROOT,
        "--model",
        "m=pvc://claim/x",
        "--on-failure",
        "fail",
        "--include",
        "*.json,*.safetensors",
        "--pvc-root",
        "/var/run/modelcache/pvc",
    ]
    assert side["restartPolicy"] == "Always"
    assert side["securityContext"]["privileged"] is True
    assert side["startupProbe"]["exec"]["command"] == [
        "python",
        "-m",
        "sidecar",
        "probe",
        "--mountpoint",
        "/var/run/modelcache/mnt",
        "--model",
        "m",
    ]
    assert side["startupProbe"]["periodSeconds"] == 1
    pvc_mount = {
        "name": "modelcache-pvc-claim",
        "mountPath": "/var/run/modelcache/pvc/claim",
        "readOnly": True,
    }
    assert pvc_mount in warm["volumeMounts"]
    assert pvc_mount in side["volumeMounts"]
    assert any("privileged" in w for w in ctx.notes.warnings)


def test_async_mode_has_no_warmup_and_a_long_startup_window_hostpath() -> None:
    out, _ = _inject(pod(vllm(), warmup="async", warmup_timeout="600"), HOSTPATH)
    (side,) = out["spec"]["initContainers"]
    assert side["name"] == "modelcache-sidecar"
    assert side["command"][-3:] == ["--warmup", "--timeout", "600"]
    probe = side["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_classic_sidecar_is_first_regular_container_with_blocking_post_start() -> None:
    out, _ = _inject(pod(vllm(), sidecar="classic"))
    first = out["spec"]["containers"][0]
    assert first["name"] == "modelcache-sidecar"
    assert "restartPolicy" not in first
    hook = first["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[:4] == ["python", "-m", "sidecar", "probe"]
    assert hook[-2] == "--wait"
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["modelcache-warmup"]


def test_classic_sidecar_in_a_job_warns() -> None:
    p = pod(vllm(), sidecar="classic")
    p["spec"]["restartPolicy"] = "Never"
    _, ctx = _inject(p)
    assert any("never completes" in w for w in ctx.notes.warnings)


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        ([], ["modelcache-warmup", "modelcache-sidecar"]),
        ([{"name": "a"}, {"name": "b"}], ["modelcache-warmup", "modelcache-sidecar", "a", "b"]),
        (
            [
                {"name": "istio-init"},
                {"name": "a"},
                {"name": "istio-proxy", "restartPolicy": "Always"},
            ],
            ["istio-init", "a", "istio-proxy", "modelcache-warmup", "modelcache-sidecar"],
        ),
        (
            [{"name": "linkerd-init"}, {"name": "user-sidecar", "restartPolicy": "Always"}],
            ["linkerd-init", "modelcache-warmup", "modelcache-sidecar", "user-sidecar"],
        ),
    ],
)
def test_init_container_order(init: list[dict[str, Any]], expected: list[str]) -> None:
    init = [{"image": "x", **c} for c in init]
    out, _ = _inject(pod(vllm(), init=init))
    assert [c["name"] for c in out["spec"]["initContainers"]] == expected


def test_file_sources_under_allowed_roots_reach_the_warmup_read_only_hostpath() -> None:
    cfg = Config(file_roots=("/srv/models",), node_cache="hostPath")
    p = pod(vllm("/srv/models/m"), model="m=file:///srv/models/m")
    out, result = mutate_pod(p, namespace="ns", config=cfg)
    assert result.decision == "injected", result.reason
    warm, side = out["spec"]["initContainers"]
    for c in (warm, side):
        cmd = c["command"]
        assert cmd[cmd.index("--file-root") + 1] == "/srv/models"
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/srv/models")
        assert mount["readOnly"] is True
    vol = next(v for v in out["spec"]["volumes"] if v["name"] == mount["name"])
    assert vol["hostPath"] == {"path": "/srv/models", "type": "Directory"}
    assert_pod_ok(out)


def test_guaranteed_pod_stays_guaranteed_and_best_effort_stays_best_effort() -> None:
    fixed = {"limits": {"cpu": "4", "memory": "8Gi"}, "requests": {"cpu": "4", "memory": "8Gi"}}
    out, _ = _inject(pod(vllm(resources=fixed)))
    for c in out["spec"]["initContainers"]:
        res = c["resources"]
        assert res["requests"] == res["limits"], c["name"]
        assert {"cpu", "memory"} <= set(res["limits"])
    out, _ = _inject(pod(vllm()))
    assert all("resources" not in c for c in out["spec"]["initContainers"])
    out, _ = _inject(pod(vllm(resources={"requests": {"cpu": "1"}})))
    assert out["spec"]["initContainers"][0]["resources"]["requests"]["memory"] == "256Mi"


def test_injected_containers_explain_failures() -> None:
    out, _ = _inject(pod(vllm()))
    for c in out["spec"]["initContainers"]:
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_app_credentials_reach_our_containers_hostpath() -> None:
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "t"}}}
    endpoint = {"name": "HF_ENDPOINT", "value": "http://attacker.example"}
    out, _ = _inject(
        pod(vllm(env=[token, endpoint], envFrom=[{"secretRef": {"name": "s3"}, "prefix": "X_"}])),
        HOSTPATH,
    )
    for c in out["spec"]["initContainers"]:
        env = {e["name"]: e for e in c["env"]}
        assert env["HF_TOKEN"] == token, "the app's own token"
        # a pod never chooses where the shared cache is filled from: the cluster's Secret
        assert env["HF_ENDPOINT"]["valueFrom"]["secretKeyRef"]["name"] == (
            "modelcache-hf-credentials"
        )
        assert "envFrom" not in c, "only credential keys of the app's Secrets, never all"
    out, _ = _inject(pod(vllm(envFrom=[{"secretRef": {"name": "hf"}}])), HOSTPATH)
    for c in out["spec"]["initContainers"]:
        env = {e["name"]: e for e in c["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "hf",
            "key": "HF_TOKEN",
            "optional": True,
        }
        assert "envFrom" not in c


@pytest.mark.parametrize(
    ("model", "env"),
    [
        ("hf://org/m", ["HF_TOKEN", "HF_ENDPOINT"]),
        (
            "s3://bkt/m",
            S3_ENV,
        ),
        ("https://mirror.example/m/", []),
        ("gs://bkt/m", ["GCS_ACCESS_KEY_ID", "GCS_SECRET_ACCESS_KEY", "GCS_ENDPOINT_URL"]),
        ("pvc://claim", []),
        (
            "a=s3://bkt/a,b=s3://bkt/b",
            S3_ENV,
        ),
    ],
)
def test_credentials_only_for_used_schemes_and_only_in_our_containers_hostpath(
    model: str, env: list[str]
) -> None:
    out, _ = _inject(pod(vllm(), model=model), HOSTPATH)
    for c in out["spec"]["initContainers"]:
        creds = [e for e in c.get("env", []) if e["name"] != "MODELCACHE_POD"]
        assert [e["name"] for e in creds] == env
        for e in creds:
            assert "value" not in e
            assert e["valueFrom"]["secretKeyRef"]["optional"] is True
    app_env = {e["name"] for e in out["spec"]["containers"][0].get("env", [])}
    assert not app_env & {"HF_TOKEN", "HF_ENDPOINT", "GCS_ACCESS_KEY_ID", *S3_ENV}


def test_credentials_secret_name_from_config() -> None:
    cfg = Config.model_validate(
        {
            "nodeCache": "hostPath",
            "credentials": {"hf": {"secretName": "team-hf", "keys": {"tok": "HF_TOKEN"}}},
        }
    )
    out, _ = _inject(pod(vllm()), cfg)
    env = out["spec"]["initContainers"][0]["env"][1:]
    assert env == [
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "team-hf", "key": "tok", "optional": True}},
        }
    ]


def test_host_network_warns_only_where_our_containers_fetch() -> None:
    p = pod(vllm())
    p["spec"]["hostNetwork"] = True
    _, ctx = _inject(p, HOSTPATH)
    assert any("hostNetwork" in w for w in ctx.notes.warnings)
    _, ctx = _inject(p)  # csi: the node side fetches, through the node's own network
    assert not any("hostNetwork" in w for w in ctx.notes.warnings)


# --- rewrites --------------------------------------------------------------------------------

REWRITES: list[tuple[str, dict[str, Any], dict[str, str], dict[str, Any]]] = [
    (
        "vllm-serve",
        vllm(),
        {"rewrite": "path"},
        {
            "command": [
                "vllm",
                "serve",
                "/models/m",
                "--served-model-name",
                "org/m",
            ]
        },
    ),
    (
        "vllm-args-only-entrypoint",
        {"name": "v", "image": VLLM, "args": ["org/m", "--port", "1"]},
        {"rewrite": "path"},
        {
            "args": [
                "/models/m",
                "--served-model-name",
                "org/m",
                "--port",
                "1",
            ]
        },
    ),
    (
        "vllm-user-strategy-and-name",
        {
            "name": "v",
            "image": VLLM,
            "args": [
                "--model",
                "org/m",
                "--served-model-name=x",
                "--safetensors-load-strategy",
                "lazy",
            ],
        },
        {"rewrite": "path"},
        {
            "args": [
                "--model",
                "/models/m",
                "--served-model-name=x",
                "--safetensors-load-strategy",
                "lazy",
            ]
        },
    ),
    (
        "vllm-tokenizer-and-revisioned-annotation",
        {
            "name": "v",
            "image": VLLM,
            "args": ["--model", "org/m", "--tokenizer", "org/m", "--load-format", "auto"],
        },
        {"model": "hf://org/m@v1", "rewrite": "path"},
        {
            "args": [
                "--model",
                "/models/m",
                "--served-model-name",
                "org/m",
                "--tokenizer",
                "/models/m",
                "--load-format",
                "auto",
            ]
        },
    ),
    (
        "sglang",
        {"name": "s", "image": "lmsysorg/sglang:1", "args": ["--model-path=org/m"]},
        {"rewrite": "path"},
        {"args": ["--model-path=/models/m", "--served-model-name", "org/m"]},
    ),
    (
        "tgi-env",
        {
            "name": "t",
            "image": "ghcr.io/huggingface/text-generation-inference:3",
            "env": [
                {"name": "MODEL_ID", "value": "org/m"},
                {"name": "HF_HUB_OFFLINE", "value": "0"},
            ],
        },
        {"rewrite": "path"},
        {
            "env": [
                {"name": "MODEL_ID", "value": "/models/m"},
                {"name": "HF_HUB_OFFLINE", "value": "0"},
            ]
        },
    ),
    (
        "llamacpp-hf-file-before-repo",
        {
            "name": "l",
            "image": "x",
            "command": ["llama-server"],
            "args": ["--hf-file", "q4.gguf", "--hf-repo", "org/m-GGUF:Q4", "--port", "1"],
        },
        {},
        {"args": ["-m", "/models/m-GGUF/q4.gguf", "--alias", "org/m-GGUF:Q4", "--port", "1"]},
    ),
    (
        "llamacpp-inline-repo",
        {
            "name": "l",
            "image": "x",
            "command": ["llama-server", "--hf-repo=org/m-GGUF", "--hf-file=f.gguf"],
        },
        {},
        {"command": ["llama-server", "--model=/models/m-GGUF/f.gguf", "--alias", "org/m-GGUF"]},
    ),
    (
        "llamacpp-model-save-path-and-repo-give-one-model-flag",
        {
            "name": "l",
            "image": "ghcr.io/ggml-org/llama.cpp:server",
            "command": ["llama-server"],
            "args": ["--model", "/data/m.gguf", "-hf", "org/m-GGUF:Q8_0", "--port", "1"],
        },
        {},
        {"args": ["-m", "/models/m-GGUF/Q8_0.gguf", "--alias", "org/m-GGUF:Q8_0", "--port", "1"]},
    ),
    (
        "s3-subpath-generic",
        {"name": "g", "image": "my/server", "args": ["--model", "s3://bkt/m/weights"]},
        {"model": "s3://bkt/m"},
        {"args": ["--model", "/models/m/weights"]},
    ),
    (
        "sh-c-served-name-untouched",
        {
            "name": "s",
            "image": VLLM,
            "command": ["sh", "-c"],
            "args": ["vllm serve org/m --served-model-name org/m && echo done"],
        },
        {"rewrite": "path"},
        {"args": ["vllm serve /models/m --served-model-name org/m && echo done"]},
    ),
    (
        "nim",
        {
            "name": "n",
            "image": "nvcr.io/nim/x:1",
            "env": [{"name": "NIM_MODEL_PATH", "value": "s3://bkt/m"}],
        },
        {},
        {
            "env": [
                {"name": "NIM_MODEL_PATH", "value": "/models/m"},
                {"name": "NIM_SERVED_MODEL_NAME", "value": "s3://bkt/m"},
            ]
        },
    ),
]


@pytest.mark.parametrize(
    ("container", "ann", "expected"), [r[1:] for r in REWRITES], ids=[r[0] for r in REWRITES]
)
def test_rewrites(container: dict[str, Any], ann: dict[str, str], expected: dict[str, Any]) -> None:
    p = pod(container, **ann)
    ctx = plan(p)
    out = rewrite_model_args(copy.deepcopy(p), ctx)["spec"]["containers"][0]
    for key, value in expected.items():
        assert out[key] == value
    assert ctx.notes.rewrites, "no rewrite recorded"
    assert all(r["original"] != r["value"] for r in ctx.notes.rewrites)
    full, _ = mutate_pod(p, namespace="ns", config=CFG)
    assert full["spec"]["containers"][0] == {
        **out,
        "volumeMounts": full["spec"]["containers"][0]["volumeMounts"],
    }
    assert_pod_ok(full)


HUB_CACHE = "/root/.cache/huggingface/hub"


def test_hub_model_read_by_a_hub_client_keeps_its_command_line() -> None:
    out, _ = mutate_pod(pod(vllm()), namespace="ns", config=CFG)
    app = out["spec"]["containers"][0]
    assert app["command"] == ["vllm", "serve", "org/m"]
    assert "args" not in app
    names = [e["name"] for e in app["env"]]
    assert "HF_HUB_OFFLINE" not in names and "TRANSFORMERS_OFFLINE" not in names
    assert {"name": "HF_HUB_CACHE", "value": HUB_CACHE} in app["env"]
    hub = [m for m in app["volumeMounts"] if m["name"] == "modelcache-hub"]
    assert hub == [
        {
            "name": "modelcache-hub",
            "mountPath": f"{HUB_CACHE}/models--org--m",
            "subPath": "models--org--m",
        }
    ]
    status = json.loads(out["metadata"]["annotations"]["modelcache.io/status"])
    assert status["delivery"] == [
        {"container": "vllm", "model": "m", "mode": "hub-cache", "path": HUB_CACHE}
    ]
    sidecar = out["spec"]["initContainers"][1]
    cmd = sidecar["command"]
    assert cmd[cmd.index("--hub-cache") + 1] == "/var/run/modelcache/hub"
    assert cmd[cmd.index("--hub-link-root") + 1] == "/var/run/modelcache/view"
    assert cmd[cmd.index("--on-failure") + 1] == "continue"
    assert {"name": "modelcache-hub", "mountPath": "/var/run/modelcache/hub"} in sidecar[
        "volumeMounts"
    ]
    warmup = out["spec"]["initContainers"][0]["command"]
    assert warmup[warmup.index("--on-failure") + 1] == "continue"
    again, second = mutate_pod(out, namespace="ns", config=CFG)
    assert second.patch == [] and again == out


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ([{"name": "HF_HOME", "value": "/data"}], "/data/hub"),
        ([{"name": "HF_HUB_CACHE", "value": "/cache/hub"}], "/cache/hub"),
        ([{"name": "HUGGINGFACE_HUB_CACHE", "value": "/c"}], "/c"),
        ([{"name": "HOME", "value": "/home/app"}], "/home/app/.cache/huggingface/hub"),
        ([{"name": "XDG_CACHE_HOME", "value": "/x"}], "/x/huggingface/hub"),
        (
            [{"name": "B", "value": "/base"}, {"name": "HF_HOME", "value": "$(B)/hf"}],
            "/base/hf/hub",
        ),
    ],
)
def test_hub_cache_dir_follows_the_containers_env(env: list[dict[str, str]], expected: str) -> None:
    out, _ = mutate_pod(pod(vllm(env=env)), namespace="ns", config=CFG)
    app = out["spec"]["containers"][0]
    assert app["env"] == env, "an env the container sets is never added to or changed"
    assert {
        "name": "modelcache-hub",
        "mountPath": f"{expected}/models--org--m",
        "subPath": "models--org--m",
    } in app["volumeMounts"]


def test_download_dir_flag_is_the_hub_cache() -> None:
    p = pod(vllm(args=["--download-dir", "/mnt/cache"]))
    out, _ = mutate_pod(p, namespace="ns", config=CFG)
    app = out["spec"]["containers"][0]
    assert "env" not in app
    assert any(m["mountPath"] == "/mnt/cache/models--org--m" for m in app["volumeMounts"])


def test_non_root_without_home_is_left_alone_with_the_reason() -> None:
    p = pod(vllm(securityContext={"runAsUser": 1000}))
    out, result = mutate_pod(p, namespace="ns", config=CFG)
    assert result.decision == "skipped"
    assert "non-root" in result.reason
    assert out["metadata"]["annotations"]["modelcache.io/skipped"] == result.reason
    assert result.warnings[0].startswith("not injected: ")


def test_rewrite_off_changes_no_app_args() -> None:
    p = pod(vllm(), rewrite="off")
    out, _ = mutate_pod(p, namespace="ns", config=CFG)
    assert out["spec"]["containers"][0]["command"] == ["vllm", "serve", "org/m"]
    assert "env" not in out["spec"]["containers"][0]


def test_status_records_every_rewrite_and_round_trips() -> None:
    out, _ = mutate_pod(pod(vllm(), rewrite="path"), namespace="ns", config=CFG)
    raw = out["metadata"]["annotations"]["modelcache.io/status"]
    data = json.loads(raw)
    assert data["rewrites"] == [
        {"container": "vllm", "field": "command serve", "original": "org/m", "value": "/models/m"}
    ]
    assert data["models"][0]["cacheKey"] == data["models"][0]["cacheKey"].lower()
    status = read_status(out["metadata"]["annotations"])
    assert status is not None
    assert [m.to_arg() for m in status.models] == ["m=hf://org/m@main"]
    assert status.containers == ("vllm",)
    assert out["metadata"]["labels"]["modelcache.io/injected"] == "true"


@pytest.mark.parametrize(
    "raw", ["not json", "[]", '{"version": 99}', '{"version": 1, "models": [{"name": "x"}]}']
)
def test_unreadable_status_is_ignored_and_denied(raw: str) -> None:
    assert read_status({"modelcache.io/status": raw}) is None
    p = pod(vllm())
    p["metadata"]["annotations"]["modelcache.io/status"] = raw
    result = plan_pod(p, namespace="ns", config=CFG)
    assert not isinstance(result, Context)
    assert not result.allowed and "modelcache.io/status" in (result.message or "")


def test_write_status_creates_null_maps() -> None:
    p = pod(vllm())
    p["metadata"]["annotations"] = None
    ctx = plan(pod(vllm()))
    out = write_status(copy.deepcopy(p), ctx)
    assert "modelcache.io/status" in out["metadata"]["annotations"]


# --- affinity --------------------------------------------------------------------------------


def test_prefer_adds_one_term_per_model() -> None:
    p = pod(vllm(), model="a=hf://org/a,b=hf://org/b")
    ctx = plan(p)
    out = add_affinity(copy.deepcopy(p), ctx)
    terms = out["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert [t["weight"] for t in terms] == [100, 20]
    keys = [m.source.cache_key for m in ctx.named_models]
    assert [t["preference"]["matchExpressions"][0]["key"] for t in terms] == [
        f"cache.modelcache.io/{k}" for k in keys
    ]
    assert terms[0]["preference"]["matchExpressions"][0]["values"] == ["ready"]


def test_require_is_anded_into_every_term() -> None:
    p = pod(vllm(), affinity="require")
    p["spec"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]},
                ]
            }
        },
        "podAntiAffinity": {"x": 1},
    }
    p["spec"]["nodeSelector"] = {"zone": "a"}
    ctx = plan(p)
    out = add_affinity(copy.deepcopy(p), ctx)
    terms = out["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    key = f"cache.modelcache.io/{ctx.named_models[0].source.cache_key}"
    assert len(terms) == 2
    assert terms[0]["matchExpressions"][0] == {"key": "gpu", "operator": "Exists"}
    assert terms[0]["matchExpressions"][1]["key"] == key
    assert terms[1]["matchFields"][0]["key"] == "metadata.name"
    assert terms[1]["matchExpressions"][0]["key"] == key
    assert out["spec"]["affinity"]["podAntiAffinity"] == {"x": 1}
    assert out["spec"]["nodeSelector"] == {"zone": "a"}
    assert any("agentEnabled" in w for w in ctx.notes.warnings)


def test_require_without_terms_creates_one_and_agent_silences_warning() -> None:
    p = pod(vllm(), affinity="require")
    ctx = plan(p, Config(agent_enabled=True))
    out = add_affinity(copy.deepcopy(p), ctx)
    terms = out["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert len(terms) == 1
    assert not any("agentEnabled" in w for w in ctx.notes.warnings)


@pytest.mark.parametrize(
    ("init", "warned"),
    [
        ([{"name": "istio-init"}], True),
        ([{"name": "istio-init"}, {"name": "istio-proxy", "restartPolicy": "Always"}], False),
        ([{"name": "linkerd-init"}], True),
        ([{"name": "other-init"}], False),
    ],
)
def test_mesh_without_native_proxy_warns(init: list[dict[str, Any]], warned: bool) -> None:
    p = pod(vllm(), init=[{"image": "x", **c} for c in init])
    _, ctx = _inject(p, HOSTPATH)
    assert any("cannot reach the model source" in w for w in ctx.notes.warnings) == warned
    _, ctx = _inject(p)  # csi: our containers talk only to the node side's socket
    assert not any("cannot reach the model source" in w for w in ctx.notes.warnings)


def test_flag_after_a_script_is_rewritten_in_the_first_pass() -> None:
    """Inserting --served-model-name shifts the sh -c script; the flag after it is still found.

    Found by the property test: the script's position was computed once before the inserts.
    """
    from webhook.config import Config
    from webhook.pipeline import mutate_pod

    cmd = ["--model=org/m", "sh", "-c", "--model", "--model=org/m"]
    pod = {
        "metadata": {"annotations": {"modelcache.io/rewrite": "path"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/x", "command": cmd}]},
    }
    mutated, _ = mutate_pod(pod, namespace="ns", config=Config())
    command = mutated["spec"]["containers"][-1]["command"]
    assert command[0] == "--model=/models/m"
    assert command[-1] == "--model=/models/m"
    _, again = mutate_pod(mutated, namespace="ns", config=Config())
    assert again.patch == []


def test_serving_cached_models_during_an_outage_is_a_cluster_setting_off_by_default() -> None:
    out, _ = _inject(pod(vllm()), HOSTPATH)
    for c in out["spec"]["initContainers"]:
        assert "--serve-cached-when-unreachable" not in c["command"]
    out, _ = _inject(pod(vllm()), Config(serve_cached_when_unreachable=True, node_cache="hostPath"))
    for c in out["spec"]["initContainers"]:
        assert "--serve-cached-when-unreachable" in c["command"]
