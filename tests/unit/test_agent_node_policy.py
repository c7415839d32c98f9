"""The agent's ValidatingAdmissionPolicy: what it matches and what its rules say.

No CEL engine here (none is a dependency, and a stand-in would test itself): the checks read
the policy's fields and the structure of its expressions. Each expression must be well formed
(balanced brackets and quotes), may use only the variables the policy defines, and must say
the intended thing: the request's node is the one the token is bound to, labels other than
the agent's own prefix (taken from the agent's code) stay as they were, and annotations other
than the two of peer fetch (names taken from the peer code) stay as they were.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sidecar.agent import LABEL_PREFIX
from sidecar.node.peers import FETCHING_PREFIX, PEER_ANNOTATION

AGENT_DIR = Path(__file__).resolve().parents[2] / "manifests" / "agent"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


def _docs() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((AGENT_DIR / "node-policy.yaml").read_text())
    return {d["kind"]: d for d in docs if d}


def _serviceaccount() -> dict[str, Any]:
    return yaml.safe_load((AGENT_DIR / "serviceaccount.yaml").read_text())


def _tokens(expr: str) -> list[str]:
    """CEL tokens: quoted strings, identifiers (with dots), operators, brackets."""
    token_re = re.compile(
        r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[A-Za-z_][A-Za-z0-9_.]*|==|!=|&&|\|\||"
        r"[()\[\]{},?:!<>+\-*/]|\d+|\s+"
    )
    out, pos = [], 0
    while pos < len(expr):
        m = token_re.match(expr, pos)
        assert m is not None, f"cannot read {expr[pos:]!r} in {expr!r}"
        if not m.group().isspace():
            out.append(m.group())
        pos = m.end()
    return out


def _well_formed(expr: str) -> list[str]:
    tokens = _tokens(expr)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for t in tokens:
        if t in "([{":
            stack.append(t)
        elif t in pairs:
            assert stack and stack.pop() == pairs[t], f"unbalanced {t!r} in {expr!r}"
    assert not stack, f"unclosed {stack} in {expr!r}"
    return tokens


def _expressions(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    exprs = [c["expression"] for c in spec["matchConditions"]]
    exprs += [v["expression"] for v in spec["variables"]]
    for v in spec["validations"]:
        exprs.append(v["expression"])
        if "messageExpression" in v:
            exprs.append(v["messageExpression"])
    return exprs


def test_policy_is_bound_and_denies() -> None:
    docs = _docs()
    policy, binding = docs["ValidatingAdmissionPolicy"], docs["ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert "matchResources" not in binding["spec"]  # every node
    assert policy["spec"]["failurePolicy"] == "Fail"


def test_policy_matches_the_agents_node_updates_only() -> None:
    spec = _docs()["ValidatingAdmissionPolicy"]["spec"]
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}
    ]
    sa = _serviceaccount()["metadata"]
    [condition] = spec["matchConditions"]
    user = f"system:serviceaccount:{sa['namespace']}:{sa['name']}"
    assert _well_formed(condition["expression"]) == [
        "request.userInfo.username",
        "==",
        f"'{user}'",
    ]


def test_every_expression_is_well_formed_and_uses_defined_variables() -> None:
    policy = _docs()["ValidatingAdmissionPolicy"]
    defined = {v["name"] for v in policy["spec"]["variables"]}
    used: set[str] = set()
    for expr in _expressions(policy):
        for t in _well_formed(expr):
            if t.startswith("variables."):
                used.add(t.split(".")[1])
    assert used <= defined, used - defined
    assert used == defined  # none defined for nothing


def test_the_node_must_be_the_one_the_token_is_bound_to() -> None:
    spec = _docs()["ValidatingAdmissionPolicy"]["spec"]
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    extra = ["request.userInfo.extra", "[", f"'{NODE_NAME_EXTRA}'", "]"]
    # the one node the token's user info names, else '' (fails closed: no node, no patch)
    assert _well_formed(variables["boundNode"]) == [
        *("has", "(", "request.userInfo.extra", ")", "&&"),
        *(f"'{NODE_NAME_EXTRA}'", "in", "request.userInfo.extra", "&&"),
        *("size", "(", *extra, ")", "==", "1"),
        *("?", *extra, "[", "0", "]", ":", "''"),
    ]
    first = _well_formed(spec["validations"][0]["expression"])
    assert first == [
        "variables.boundNode",
        "!=",
        "''",
        "&&",
        "object.metadata.name",
        "==",
        "variables.boundNode",
    ]


def test_only_the_agents_labels_may_change() -> None:
    spec = _docs()["ValidatingAdmissionPolicy"]["spec"]
    prefix = f"'{LABEL_PREFIX}'"
    added, removed = (_well_formed(v["expression"]) for v in spec["validations"][1:3])
    # new or changed: the agent's prefix, or equal to the old value
    assert added[:5] == ["variables.newLabels.all", "(", "k", ",", "k.startsWith"]
    assert added[5:8] == ["(", prefix, ")"]
    assert added[8:] == [
        "||",
        "(",
        "k",
        "in",
        "variables.oldLabels",
        "&&",
        "variables.oldLabels",
        "[",
        "k",
        "]",
        "==",
        "variables.newLabels",
        "[",
        "k",
        "]",
        ")",
        ")",
    ]
    # removed: only the agent's prefix
    assert removed == [
        "variables.oldLabels.all",
        "(",
        "k",
        ",",
        "k.startsWith",
        "(",
        prefix,
        ")",
        "||",
        "k",
        "in",
        "variables.newLabels",
        ")",
    ]
    # and not the Node's spec (taints, podCIDR, unschedulable)
    assert _well_formed(spec["validations"][-1]["expression"]) == [
        "object.spec",
        "==",
        "oldObject.spec",
    ]
    variables = {v["name"]: _well_formed(v["expression"]) for v in spec["variables"]}
    for side, obj in (("new", "object"), ("old", "oldObject")):
        for field in ("labels", "annotations"):
            assert variables[f"{side}{field.capitalize()}"] == [
                "has",
                "(",
                f"{obj}.metadata.{field}",
                ")",
                "?",
                f"{obj}.metadata.{field}",
                ":",
                "{",
                "}",
            ]
    for v in spec["validations"]:
        assert v["reason"] == "Forbidden"


def _peer_keys(k: str = "k") -> list[str]:
    """``k`` is one of the two peer-fetch annotations (exactly the name, or under the prefix)."""
    return [
        k,
        "==",
        f"'{PEER_ANNOTATION}'",
        "||",
        f"{k}.startsWith",
        "(",
        f"'{FETCHING_PREFIX}'",
        ")",
    ]


def test_only_the_peer_fetch_annotations_may_change() -> None:
    """Allowed: add, change or remove ``modelcache.io/peer`` and
    ``fetching.modelcache.io/<key>``. Refused: adding, changing or removing any other
    annotation (``fetching.modelcache.io`` without the slash, ``x.modelcache.io/peer``,
    ``modelcache.io/peer-x`` are other annotations)."""
    spec = _docs()["ValidatingAdmissionPolicy"]["spec"]
    validations = spec["validations"]
    assert len(validations) == 6
    added, removed = (_well_formed(v["expression"]) for v in validations[3:5])
    # new or changed: a peer-fetch annotation, or equal to the old value
    assert added == [
        "variables.newAnnotations.all",
        "(",
        "k",
        ",",
        *_peer_keys(),
        "||",
        *("(", "k", "in", "variables.oldAnnotations", "&&"),
        *("variables.oldAnnotations", "[", "k", "]", "=="),
        *("variables.newAnnotations", "[", "k", "]", ")"),
        ")",
    ]
    # removed: only a peer-fetch annotation
    assert removed == [
        "variables.oldAnnotations.all",
        "(",
        "k",
        ",",
        *_peer_keys(),
        "||",
        *("k", "in", "variables.newAnnotations"),
        ")",
    ]
    # the prefix the code writes ends in its slash: fetching.modelcache.io-x/... is refused
    assert FETCHING_PREFIX.endswith(".modelcache.io/")
    for v in validations[3:5]:
        assert PEER_ANNOTATION in v["message"] and FETCHING_PREFIX in v["message"]
        assert v["reason"] == "Forbidden"


def test_labels_and_annotations_are_judged_apart() -> None:
    """A peer annotation does not open the labels, nor a cache label the annotations: each
    rule reads only its own map."""
    spec = _docs()["ValidatingAdmissionPolicy"]["spec"]
    for v in spec["validations"][1:3]:
        assert "Annotations" not in v["expression"]
        assert PEER_ANNOTATION not in v["expression"]
    for v in spec["validations"][3:5]:
        assert "Labels" not in v["expression"]
        assert LABEL_PREFIX not in v["expression"]
