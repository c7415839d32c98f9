"""The Pod Security Standards checker (tests/fixtures/podsecurity.py) finds what it is for,
and the webhook's additions meet ``restricted`` in ``nodeCache: csi`` (not in hostPath)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.fixtures.podsecurity import (
    added_violations,
    pod_security_level,
    pod_security_violations,
)
from webhook.config import Config
from webhook.pipeline import mutate_pod

RESTRICTED_SC = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def restricted_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"modelcache.io/model": "hf://org/m"}},
        "spec": {
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.8.5",
                    "args": ["--model", "org/m"],
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    "securityContext": copy.deepcopy(RESTRICTED_SC),
                }
            ],
            "volumes": [{"name": "cfg", "configMap": {"name": "c"}}],
        },
    }


def _set(pod: dict[str, Any], path: str, value: Any) -> None:
    node: Any = pod
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    node[int(last) if last.isdigit() else last] = value


# (field, value, level broken, path named in the violation)
BREAKS = [
    ("spec.hostNetwork", True, "baseline", "spec.hostNetwork"),
    ("spec.hostPID", True, "baseline", "spec.hostPID"),
    (
        "spec.containers.0.securityContext.privileged",
        True,
        "baseline",
        "spec.containers[vllm].securityContext.privileged",
    ),
    (
        "spec.containers.0.securityContext.capabilities.add",
        ["SYS_ADMIN"],
        "baseline",
        "spec.containers[vllm].securityContext.capabilities.add",
    ),
    (
        "spec.containers.0.securityContext.capabilities.add",
        ["CHOWN"],
        "restricted",
        "spec.containers[vllm].securityContext.capabilities.add",
    ),
    ("spec.volumes.0", {"name": "h", "hostPath": {"path": "/"}}, "baseline", "spec.volumes[h]"),
    ("spec.volumes.0", {"name": "n", "nfs": {"server": "s", "path": "/"}}, "restricted", "nfs"),
    (
        "spec.containers.0.ports",
        [{"containerPort": 80, "hostPort": 80}],
        "baseline",
        "spec.containers[vllm].ports[80].hostPort",
    ),
    (
        "spec.containers.0.securityContext.seccompProfile",
        {"type": "Unconfined"},
        "baseline",
        "seccompProfile.type",
    ),
    (
        "spec.containers.0.securityContext.procMount",
        "Unmasked",
        "baseline",
        "procMount",
    ),
    (
        "spec.containers.0.securityContext.seLinuxOptions",
        {"type": "spc_t"},
        "baseline",
        "seLinuxOptions.type",
    ),
    (
        "spec.securityContext.sysctls",
        [{"name": "kernel.msgmax", "value": "1"}],
        "baseline",
        "sysctls[kernel.msgmax]",
    ),
    (
        "metadata.annotations.container.apparmor.security.beta.kubernetes.io/vllm",
        "unconfined",
        "baseline",
        "metadata.annotations[container.apparmor.security.beta.kubernetes.io/vllm]",
    ),
    (
        "spec.containers.0.securityContext.allowPrivilegeEscalation",
        True,
        "restricted",
        "allowPrivilegeEscalation",
    ),
    (
        "spec.containers.0.securityContext.runAsNonRoot",
        False,
        "restricted",
        "spec.containers[vllm].securityContext.runAsNonRoot",
    ),
    ("spec.containers.0.securityContext.runAsUser", 0, "restricted", "runAsUser"),
    (
        "spec.containers.0.securityContext.capabilities",
        {},
        "restricted",
        "capabilities.drop",
    ),
    (
        "spec.containers.0.securityContext.seccompProfile",
        None,
        "restricted",
        "seccompProfile.type",
    ),
]


def test_restricted_pod_meets_restricted() -> None:
    assert pod_security_violations(restricted_pod(), "restricted") == []
    assert pod_security_level(restricted_pod()) == "restricted"


@pytest.mark.parametrize(("field", "value", "level", "path"), BREAKS, ids=lambda x: str(x)[:40])
def test_each_control_is_checked(field: str, value: Any, level: str, path: str) -> None:
    pod = restricted_pod()
    if field.startswith("metadata.annotations."):
        pod["metadata"]["annotations"][field.removeprefix("metadata.annotations.")] = value
    elif value is None:
        del pod["spec"]["containers"][0]["securityContext"]["seccompProfile"]
    else:
        _set(pod, field, value)
    found = pod_security_violations(pod, "restricted")
    assert any(path in v.path for v in found), [str(v) for v in found]
    assert {v.level for v in found} == {level}
    assert (pod_security_violations(pod, "baseline") == []) == (level == "restricted")


def test_pod_level_settings_cover_containers() -> None:
    pod = restricted_pod()
    sc = pod["spec"]["containers"][0]["securityContext"]
    del sc["runAsNonRoot"], sc["seccompProfile"]
    assert pod_security_violations(pod) != []
    pod["spec"]["securityContext"] = {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod_security_violations(pod) == []


def test_bad_level_is_refused() -> None:
    with pytest.raises(ValueError, match="level must be one of"):
        pod_security_violations(restricted_pod(), "strict")


@pytest.mark.parametrize("warmup", ["block", "async"])
def test_csi_injection_meets_restricted(warmup: str) -> None:
    pod = restricted_pod()
    pod["metadata"]["annotations"]["modelcache.io/warmup"] = warmup
    out, result = mutate_pod(pod, namespace="ml", config=Config())
    assert result.decision == "injected", result.reason
    assert pod_security_violations(out, "restricted") == []
    assert added_violations(pod, out) == []


def test_hostpath_injection_breaks_baseline_and_the_check_says_where() -> None:
    pod = restricted_pod()
    out, result = mutate_pod(pod, namespace="ml", config=Config(node_cache="hostPath"))
    assert result.decision == "injected", result.reason
    paths = {v.path for v in added_violations(pod, out)}
    assert "spec.initContainers[modelcache-sidecar].securityContext.privileged" in paths
    assert "spec.volumes[modelcache-cache].hostPath" in paths
    assert "spec.initContainers[modelcache-warmup].securityContext.runAsUser" in paths
    assert pod_security_level(out) == "privileged"


def test_added_violations_ignore_the_apps_own() -> None:
    """An app that is privileged itself is the app's business; ours must still be clean."""
    pod = restricted_pod()
    pod["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    out, _ = mutate_pod(pod, namespace="ml", config=Config())
    assert added_violations(pod, out) == []
    assert pod_security_level(out) == "privileged"
