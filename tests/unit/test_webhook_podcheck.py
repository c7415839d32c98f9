"""The pod checks themselves: each rule fires on a pod that breaks it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.fixtures.podcheck import PodCheckError, api_server_violations, validate_pod_strict

BASE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "p"},
    "spec": {
        "initContainers": [{"name": "i", "image": "x"}],
        "containers": [
            {"name": "a", "image": "x", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}
        ],
        "volumes": [{"name": "v", "emptyDir": {}}],
    },
}


def broken(path: str, value: Any) -> dict[str, Any]:
    pod = copy.deepcopy(BASE)
    node: Any = pod["spec"]
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if last.isdigit():
        node.append(value)
    else:
        node[last] = value
    return pod


def test_base_is_clean() -> None:
    validate_pod_strict(BASE)
    assert api_server_violations(BASE) == []


@pytest.mark.parametrize(
    ("pod", "needle"),
    [
        (broken("containers.1", {"name": "i", "image": "x"}), "duplicate container names: i"),
        (broken("volumes.1", {"name": "v", "emptyDir": {}}), "duplicate volume names: v"),
        (
            broken("containers.0.volumeMounts.1", {"name": "nope", "mountPath": "/n"}),
            "unknown volume",
        ),
        (
            broken("containers.0.volumeMounts.1", {"name": "v", "mountPath": "/v"}),
            "duplicate mountPath",
        ),
        (
            broken(
                "containers.0.volumeMounts.1",
                {"name": "v", "mountPath": "/b", "mountPropagation": "Bidirectional"},
            ),
            "Bidirectional mount without privileged",
        ),
        (broken("containers.0.restartPolicy", "Always"), "init containers only"),
        (broken("initContainers.0.restartPolicy", "OnFailure"), "only Always"),
        (
            broken("initContainers.0.startupProbe", {"exec": {"command": ["true"]}}),
            "needs restartPolicy Always",
        ),
        (
            broken(
                "containers.0.volumeMounts.1", {"name": "v", "mountPath": "/s", "subPath": "../x"}
            ),
            "subPath",
        ),
    ],
)
def test_api_server_rules(pod: dict[str, Any], needle: str) -> None:
    assert any(needle in v for v in api_server_violations(pod)), api_server_violations(pod)


@pytest.mark.parametrize(
    "pod",
    [
        broken("containers.0.unknownField", 1),
        broken("containers.0.image", 3),
        broken("restartPolicy", ["x"]),
    ],
)
def test_schema_strict(pod: dict[str, Any]) -> None:
    with pytest.raises(PodCheckError, match=r"schema 1\.29\.0"):
        validate_pod_strict(pod)


def test_bare_template_and_spec_are_accepted() -> None:
    validate_pod_strict({"metadata": {"labels": {"a": "b"}}, "spec": BASE["spec"]})
    validate_pod_strict(BASE["spec"])
    assert api_server_violations(BASE["spec"]) == []
