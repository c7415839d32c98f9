"""The pipeline as a whole: gating, decisions, purity, the patch, and robustness."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.podcheck import api_server_violations, assert_pod_ok
from webhook.config import Config
from webhook.pipeline import AdmissionResult, admit_pod, mutate_pod

CFG = Config()


def vllm_pod(**meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "v-", **meta},
        "spec": {
            "containers": [
                {"name": "vllm", "image": "vllm/vllm-openai:v0.8.5", "args": ["--model", "org/m"]}
            ]
        },
    }


def test_injected_patch_applies_to_the_mutated_pod() -> None:
    pod = vllm_pod()
    before = copy.deepcopy(pod)
    mutated, result = mutate_pod(pod, namespace="team", config=CFG)
    assert pod == before
    assert result.allowed
    assert result.decision == "injected"
    assert result.mutations == ["volumes", "containers", "mounts", "rewrite", "affinity", "status"]
    assert jsonpatch.apply_patch(pod, result.patch) == mutated
    assert_pod_ok(mutated)
    assert admit_pod(pod, namespace="team", config=CFG) == result


@pytest.mark.parametrize(
    ("pod", "namespace", "reason"),
    [
        (vllm_pod(), "kube-system", "namespace kube-system is excluded"),
        (vllm_pod(namespace="modelcache-system"), None, "namespace modelcache-system is excluded"),
        (vllm_pod(labels={"modelcache.io/inject": "false"}), "ns", "opted out"),
        (
            {"metadata": {}, "spec": {"containers": [{"name": "web", "image": "nginx"}]}},
            "ns",
            "no model",
        ),
        ({"metadata": {}, "spec": {}}, "ns", "no containers"),
        ({"spec": {"containers": [{"name": 3}]}}, "ns", "not an object with a name"),
        ({"spec": {"containers": [{"name": "a", "args": "x"}]}}, "ns", "args is not a list"),
        ({"metadata": {"labels": {"a": 1}}, "spec": {"containers": []}}, "ns", "string maps"),
        ({"metadata": [], "spec": {}}, "ns", "metadata is not an object"),
        (
            {"spec": {"containers": [{"name": "a"}], "initContainers": [{"name": "a"}]}},
            "ns",
            "duplicate container names",
        ),
    ],
)
def test_skipped_with_a_reason(pod: dict[str, Any], namespace: str | None, reason: str) -> None:
    result = admit_pod(pod, namespace=namespace, config=CFG)
    assert result.allowed
    assert result.decision == "skipped"
    assert reason in result.reason
    if result.annotate:
        # an opted-in pod left alone says why on itself and in a warning
        assert [p["path"] for p in result.patch] in (
            ["/metadata/annotations"],
            ["/metadata/annotations/modelcache.io~1skipped"],
        )
        assert result.warnings[0] == "not injected: " + result.reason
    else:
        assert result.patch == []


@pytest.mark.parametrize(
    "meta", [None, {"annotations": None, "labels": None}, {"name": "x", "managedFields": [{}]}]
)
def test_patch_applies_whatever_the_metadata_shape(meta: Any) -> None:
    pod = vllm_pod()
    if meta is None:
        pod["metadata"] = None
    else:
        pod["metadata"] = meta
    mutated, result = mutate_pod(pod, namespace="ns", config=CFG)
    assert result.decision == "injected"
    assert jsonpatch.apply_patch(pod, result.patch) == mutated
    assert mutated["metadata"]["labels"]["modelcache.io/injected"] == "true"


def test_excluded_namespaces_come_from_config() -> None:
    cfg = Config(excluded_namespaces=("batch",))
    assert admit_pod(vllm_pod(), namespace="batch", config=cfg).decision == "skipped"
    assert admit_pod(vllm_pod(), namespace="kube-system", config=cfg).decision == "injected"


def test_denial_names_key_value_and_accepted() -> None:
    pod = vllm_pod(annotations={"modelcache.io/affinity": "always"})
    result = admit_pod(pod, namespace="ns", config=CFG)
    assert result == AdmissionResult(
        allowed=False,
        patch=[],
        warnings=[],
        message="modelcache.io/affinity: invalid value 'always'; accepted: prefer, require, off",
        decision="denied",
        reason="invalid modelcache.io/affinity",
        mutations=[],
    )


def test_bad_inject_label_is_denied() -> None:
    result = admit_pod(vllm_pod(labels={"modelcache.io/inject": "yes"}), namespace="n", config=CFG)
    assert result.decision == "denied"
    assert result.message is not None
    assert "modelcache.io/inject" in result.message


def test_reinjection_is_unchanged() -> None:
    mutated, _ = mutate_pod(vllm_pod(), namespace="ns", config=CFG)
    result = admit_pod(mutated, namespace="ns", config=CFG)
    assert (result.decision, result.patch) == ("unchanged", [])


def test_detection_is_reported_in_a_warning() -> None:
    result = admit_pod(vllm_pod(), namespace="ns", config=CFG)
    assert any("detected model hf://org/m@main in container vllm" in w for w in result.warnings)


def test_annotation_wins_over_detection() -> None:
    pod = vllm_pod(annotations={"modelcache.io/model": "s3://bkt/other"})
    mutated, result = mutate_pod(pod, namespace="ns", config=CFG)
    assert not any("detected" in w for w in result.warnings)
    warm = mutated["spec"]["initContainers"][0]
    assert "other=s3://bkt/other/" in warm["command"]


def _violations(pod: dict[str, Any]) -> set[str]:
    return {re.sub(r"^(initContainers|containers) ", "", v) for v in api_server_violations(pod)}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_names = st.sampled_from(["vllm", "app", "modelcache-sidecar", "istio-proxy", "x"])
_argv = st.lists(
    st.sampled_from(
        ["vllm", "serve", "org/m", "--model", "--model=org/m", "sh", "-c", "-m", "s3://b/m",
         "--served-model-name", "--hf-repo", "--hf-file", "f.gguf", "llama-server", "x"]
    ),
    max_size=6,
)  # fmt: skip
_container = st.fixed_dictionaries(
    {
        "name": _names,
        "image": st.sampled_from(["vllm/vllm-openai", "nginx", "ghcr.io/x/llama.cpp"]),
    },
    optional={
        "command": _argv,
        "args": _argv,
        "env": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["MODEL_ID", "NIM_MODEL_PATH", "HF_HUB_OFFLINE"])},
                optional={"value": st.sampled_from(["org/m", "hf://o/m", "/x", ""])},
            ),
            max_size=2,
        ),
        "volumeMounts": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["v", "modelcache-mnt"]),
                    "mountPath": st.sampled_from(["/models", "/x", "/models/a"]),
                }
            ),
            max_size=2,
        ),
        "restartPolicy": st.just("Always"),
    },
)
_bad = st.just("bad")
_annotations = st.fixed_dictionaries(
    {
        "modelcache.io/model": st.sampled_from(["hf://o/m", "a=s3://bkt/a,b=hf://o/b", "pvc://c/x"])
        | _bad
    },
    optional={
        "modelcache.io/warmup": st.sampled_from(["block", "async", "off"]),
        "modelcache.io/sidecar": st.sampled_from(["native", "classic"]),
        "modelcache.io/affinity": st.sampled_from(["prefer", "require", "off"]),
        "modelcache.io/rewrite": st.sampled_from(["auto", "off"]),
        "modelcache.io/containers": st.sampled_from(["vllm", "app", "vllm,x"]) | _bad,
        "modelcache.io/status": st.sampled_from(["{}", '{"version":1,"models":[]}', "x"]),
        "modelcache.io/mount-path": st.sampled_from(["/models", "/mnt/m", "/x"]) | _bad,
        "other.io/key": st.text(max_size=4),
    },
)
_affinity = st.sampled_from(
    [
        {},
        {"nodeAffinity": {}},
        {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{}, {"matchFields": []}]
                }
            }
        },
        {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        {"podAntiAffinity": {"x": 1}},
    ]
)
_pod = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {}, optional={"annotations": _annotations | st.just({}), "name": st.text(max_size=5)}
        ),
        "spec": st.fixed_dictionaries(
            {
                "containers": st.lists(
                    _container, min_size=1, max_size=3, unique_by=lambda c: c["name"]
                )
            },
            optional={
                "initContainers": st.lists(_container, max_size=2),
                "volumes": st.lists(
                    st.fixed_dictionaries({"name": st.sampled_from(["v", "modelcache-cache"])}),
                    max_size=2,
                ),
                "affinity": _affinity,
                "hostNetwork": st.booleans(),
            },
        ),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=_pod)
def test_random_pods_never_raise_and_stay_idempotent(pod: dict[str, Any]) -> None:
    before = copy.deepcopy(pod)
    mutated, result = mutate_pod(pod, namespace="ns", config=CFG)
    assert pod == before
    assert result.decision in ("injected", "skipped", "denied", "unchanged")
    assert (result.message is not None) == (not result.allowed)
    if result.decision == "injected":
        assert jsonpatch.apply_patch(pod, result.patch) == mutated
        # the mutation never introduces an API-server rule violation
        # (a user's override container may move between init and regular containers)
        assert _violations(mutated) <= _violations(pod)
        again, second = mutate_pod(mutated, namespace="ns", config=CFG)
        assert second.patch == [], second
        assert again == mutated


@settings(max_examples=200, deadline=None)
@given(pod=_json)
def test_arbitrary_json_never_raises(pod: Any) -> None:
    result = admit_pod(pod, namespace=None, config=CFG)
    assert result.decision in ("skipped", "denied", "injected", "unchanged")


def test_inject_written_as_an_annotation_is_honoured() -> None:
    pod = vllm_pod()
    pod["metadata"].setdefault("annotations", {})["modelcache.io/inject"] = "false"
    result = admit_pod(pod, namespace="ns", config=CFG)
    assert result.decision == "skipped"
    assert "annotation modelcache.io/inject=false" in result.reason


def test_an_annotated_model_no_container_names_gets_a_warning() -> None:
    pod = vllm_pod()
    pod["metadata"].setdefault("annotations", {})["modelcache.io/model"] = "hf://other/model"
    result = admit_pod(pod, namespace="ns", config=CFG)
    assert result.decision == "injected"
    assert any("not referenced by any app container" in w for w in result.warnings)


def test_a_model_named_through_an_env_var_is_found() -> None:
    pod = vllm_pod()
    app = pod["spec"]["containers"][0]
    del app["args"]
    app["command"] = ["sh", "-c", "vllm serve ${INFERENCE_MODEL} --port 8000"]
    app["env"] = [{"name": "INFERENCE_MODEL", "value": "org/from-env"}]
    result = admit_pod(pod, namespace="ns", config=CFG)
    assert result.decision == "injected"
    assert any("hf://org/from-env@main" in w for w in result.warnings)
    app["env"] = []
    app["envFrom"] = [{"configMapRef": {"name": "model"}}]
    result = admit_pod(pod, namespace="ns", config=CFG)
    assert result.decision == "skipped"
    assert "$INFERENCE_MODEL" in result.reason and "modelcache.io/model" in result.reason


@pytest.mark.parametrize(
    ("args", "uri"),
    [
        (["--model", "org/m", "--revision", "8faed76"], "hf://org/m@8faed76"),
        (["--model=org/m", "--revision=v2"], "hf://org/m@v2"),
    ],
)
def test_a_pinned_revision_is_what_is_fetched(args: list[str], uri: str) -> None:
    pod = vllm_pod()
    pod["spec"]["containers"][0].pop("command", None)
    pod["spec"]["containers"][0]["args"] = args
    result = admit_pod(pod, namespace="ns", config=CFG)
    assert any(f"detected model {uri} " in w for w in result.warnings), result.warnings


@pytest.mark.parametrize(
    ("framework_bits", "reason"),
    [
        ({"image": "ollama/ollama:0.5", "command": ["ollama", "serve"]}, "Ollama"),
        ({"image": "nvcr.io/nim/meta/llama3-8b-instruct:1.0.0"}, "NIM"),
        (
            {
                "image": "vllm/vllm-openai:v0.8.5",
                "command": ["sh", "-c", "ray start --address=x:6379 --block"],
            },
            "worker of a multi-node group",
        ),
    ],
)
def test_servers_modelcache_cannot_serve_are_left_alone_with_a_reason(
    framework_bits: dict[str, Any], reason: str
) -> None:
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", **framework_bits}]}}
    result = admit_pod(pod, namespace="ns", config=CFG)
    assert result.decision == "skipped"
    assert reason in result.reason
    assert result.warnings[0].startswith("not injected: ")


def test_path_delivery_in_a_multi_node_group_needs_the_annotation() -> None:
    pod = vllm_pod()
    app = pod["spec"]["containers"][0]
    del app["args"]
    app["command"] = ["vllm", "serve", "s3://bucket/llama", "--pipeline-parallel-size", "2"]
    result = admit_pod(pod, namespace="ns", config=CFG)
    assert result.decision == "skipped" and "multi-node group" in result.reason
    pod["metadata"].setdefault("annotations", {})["modelcache.io/model"] = "s3://bucket/llama"
    assert admit_pod(pod, namespace="ns", config=CFG).decision == "injected"


def test_extra_models_are_detected_and_warmed() -> None:
    pod = vllm_pod()
    app = pod["spec"]["containers"][0]
    del app["args"]
    app["command"] = [
        "vllm",
        "serve",
        "org/base",
        "--enable-lora",
        "--lora-modules",
        "sql=org/sql-lora",
        '{"name": "chat", "path": "org/chat-lora"}',
        "--speculative-config",
        '{"model": "org/draft", "num_speculative_tokens": 5}',
        "--tokenizer",
        "org/tok",
    ]
    mutated, _ = mutate_pod(pod, namespace="ns", config=CFG)
    status = json.loads(mutated["metadata"]["annotations"]["modelcache.io/status"])
    assert [m["uri"] for m in status["models"]] == [
        "hf://org/base@main",
        "hf://org/tok@main",
        "hf://org/sql-lora@main",
        "hf://org/chat-lora@main",
        "hf://org/draft@main",
    ]
    assert mutated["spec"]["containers"][0]["command"] == app["command"], "args untouched"
