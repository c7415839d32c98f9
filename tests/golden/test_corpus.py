"""The real-manifest corpus: manifests of other projects, through ``inject`` and the HTTPS server.

Every ``corpus/<case>.yaml`` is a workload written anew in the shape of a public manifest (vLLM,
production-stack, KServe, LeaderWorkerSet, AIBrix, the Gateway API inference extension, TGI,
SGLang, llama.cpp, Ollama, NIM, llama-stack, KubeRay), its source named in its first comment.
``corpus/expectations.yaml`` says, per pod slot, what must come out: injected or left alone and
why, the models and their revisions, where each app container reads each model (hub-cache or
path), which containers keep their command line byte for byte, which Hub references stay
reachable, which flags may appear. Each case runs

- through ``run_inject`` (the function behind ``python -m webhook inject``; one subprocess run of
  the whole corpus checks the CLI itself gives the same documents), and
- through ``python -m webhook serve --dev`` over TLS, as the pod the workload's controller
  creates (``generateName`` for ReplicaSets, the LeaderWorkerSet pod labels, Pods as written),

and every resulting pod must pass strict schema validation for Kubernetes 1.29 and 1.33 and
the API-server rules of ``tests/fixtures/podcheck.py``; a second pass changes nothing; no
offline switch appears; every flag the webhook adds is accepted by that image's framework
version (``webhook.frameworks.flag_accepted``); ``--safetensors-load-strategy`` never appears;
the node side gets the app container's own Secret (``nodePublishSecretRef``) and our containers
no credentials; what the webhook adds meets PodSecurity ``restricted``. The ``inject`` output is
kept as ``corpus/<case>.yaml.injected``; ``MODELCACHE_UPDATE_GOLDEN=1`` rewrites it, and only
after every check of the case passed. A golden file without a case fails.
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import io
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.fixtures.podcheck import api_server_violations, validate_pod_strict
from tests.fixtures.podsecurity import added_violations
from tests.fixtures.webhook_server import REPO, WebhookProcess, make_review, start_webhook_process
from webhook.config import Config
from webhook.inject import run_inject

CORPUS_DIR = Path(__file__).parent / "corpus"
EXPECTATIONS = CORPUS_DIR / "expectations.yaml"
DOCS_TABLE = REPO / "docs" / "corpus.md"
UPDATE = os.environ.get("MODELCACHE_UPDATE_GOLDEN") == "1"
SCHEMA_VERSIONS = ("1.29.0", "1.33.0")

ANN_STATUS = "modelcache.io/status"
ANN_SKIPPED = "modelcache.io/skipped"
LABEL_INJECTED = "modelcache.io/injected"
STATUS_KEYS = {"version", "models", "delivery", "containers", "rewrites", "added", "warnings"}
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
NEVER_ADDED_FLAGS = ("--safetensors-load-strategy",)
# credentials only: endpoints never come from the pod (they would steer the shared cache's fill)
CREDENTIAL_ENV = re.compile(r"^(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|AWS_(?!ENDPOINT)[A-Z0-9_]+)$")
MESH_INIT = {"istio-init", "istio-proxy", "linkerd-init"}
SHELLS = {"sh", "bash", "ash", "dash", "zsh"}
#: flags that name the model, per framework (one of them must remain, exactly once)
MODEL_FLAGS = {
    "vllm": ("--model",),
    "sglang": ("--model-path", "--model"),
    "llama.cpp": ("-m", "--model", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu"),
}
#: where the pod template sits in each workload kind the corpus uses
TEMPLATE_PATHS = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
LWS_KIND = "LeaderWorkerSet"
SCHEMA_KINDS = {"Pod", "Namespace", *TEMPLATE_PATHS}

CONFIG = Config()


# --- the corpus -------------------------------------------------------------------------------


def _case_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in CORPUS_DIR.glob("*.yaml") if p != EXPECTATIONS
    )


CASES = _case_names()
EXPECTED: dict[str, dict[str, Any]] = yaml.safe_load(EXPECTATIONS.read_text(encoding="utf-8"))[
    "cases"
]
SLOT_FIELDS = {
    "injected", "reason", "models", "delivery", "containers", "argv_unchanged", "untouched",
    "hub_refs", "env_set", "env_absent", "model_flag", "warmup_include", "annotations",
    "warnings", "server",
}  # fmt: skip
CASE_FIELDS = {"source", "framework", "note", "pods", "pending"} | SLOT_FIELDS


def _params(test: str) -> list[Any]:
    """The cases as parameters; a case whose expectation the implementation does not meet yet
    says so under ``pending: {inject|server: why}`` and is a strict xfail (it fails the suite
    as soon as it passes, so the entry is removed with the fix)."""
    out = []
    for case in CASES:
        why = (EXPECTED.get(case, {}).get("pending") or {}).get(test)
        marks = [pytest.mark.xfail(reason=why, strict=True, raises=AssertionError)] if why else []
        out.append(pytest.param(case, id=case, marks=marks))
    return out


def _input(case: str) -> str:
    return (CORPUS_DIR / f"{case}.yaml").read_text(encoding="utf-8")


def _golden(case: str) -> Path:
    return CORPUS_DIR / f"{case}.yaml.injected"


def _docs(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def slots(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod (templates) of one document by slot name."""
    kind = doc.get("kind")
    if kind == "Pod":
        return {"pod": doc}
    if kind in TEMPLATE_PATHS:
        return {"template": _dig(doc, TEMPLATE_PATHS[kind])}
    if kind == LWS_KIND:
        lwt = _dig(doc, ("spec", "leaderWorkerTemplate")) or {}
        out = {"worker": lwt["workerTemplate"]}
        if "leaderTemplate" in lwt:
            out = {"leader": lwt["leaderTemplate"], **out}
        return out
    return {}


def workload(docs: list[Any]) -> dict[str, Any]:
    """The one document of a case that holds pods (a case may add a Namespace)."""
    found = [d for d in docs if isinstance(d, dict) and slots(d)]
    assert len(found) == 1, f"a corpus case holds exactly one workload, found {len(found)}"
    return found[0]


def slot_expectations(case: str) -> dict[str, dict[str, Any]]:
    exp = EXPECTED[case]
    if "pods" in exp:
        return {
            name: {**{"framework": exp.get("framework")}, **e} for name, e in exp["pods"].items()
        }
    (name,) = slots(workload(_docs(_input(case))))
    return {name: {k: v for k, v in exp.items() if k in SLOT_FIELDS or k == "framework"}}


def server_expectation(exp: dict[str, Any]) -> dict[str, Any]:
    override = exp.get("server") or {}
    merged = {**exp, **override}
    if override.get("injected") is False:
        merged = {
            k: v for k, v in merged.items() if k in ("injected", "reason", "framework", "server")
        }
    return merged


# --- running inject ---------------------------------------------------------------------------


def inject(text: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = run_inject(io.StringIO(text), out, err, CONFIG)
    return rc, out.getvalue(), err.getvalue()


# --- reading containers -----------------------------------------------------------------------


def _basename(token: str) -> str:
    return token.rsplit("/", 1)[-1]


def argv_tokens(container: dict[str, Any]) -> list[str]:
    """command + args, with an ``sh -c SCRIPT`` script split into words."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    for i, token in enumerate(argv[:-1]):
        if _basename(token) in SHELLS:
            j = i + 1
            while j < len(argv) - 1 and argv[j].startswith("-"):
                if re.fullmatch(r"-[a-z]*c[a-z]*", argv[j]):
                    try:
                        words = shlex.split(argv[j + 1], comments=True)
                    except ValueError:
                        words = argv[j + 1].split()
                    return argv[: j + 1] + words + argv[j + 2 :]
                j += 1
            break
    return argv


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod.get("spec") or {}
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for c in _containers(pod):
        if c.get("name") == name:
            return c
    raise AssertionError(f"no container {name!r} in the pod")


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or [] if isinstance(e, dict)}


def _flag_values(tokens: list[str], flags: tuple[str, ...]) -> list[tuple[str, str]]:
    """(flag, value) for every ``FLAG VALUE`` / ``FLAG=VALUE`` in tokens."""
    out = []
    for i, token in enumerate(tokens):
        for flag in flags:
            if token == flag and i + 1 < len(tokens):
                out.append((flag, tokens[i + 1]))
            elif token.startswith(flag + "="):
                out.append((flag, token[len(flag) + 1 :]))
    return out


def _serve_positional(tokens: list[str]) -> list[str]:
    for i, token in enumerate(tokens[:-2]):
        if _basename(token) == "vllm" and tokens[i + 1] == "serve":
            nxt = tokens[i + 2]
            return [] if nxt.startswith("-") else [nxt]
    return []


def model_references(framework: str, container: dict[str, Any]) -> list[str]:
    tokens = argv_tokens(container)
    values = [v for _, v in _flag_values(tokens, MODEL_FLAGS[framework])]
    if framework == "vllm":
        values = _serve_positional(tokens) + values
        if not container.get("command") and tokens and not tokens[0].startswith("-"):
            values = [tokens[0], *values]  # args only: the image entrypoint is `vllm serve`
    return values


def _flag_name(token: str) -> str | None:
    if not token.startswith("-") or token in ("-", "--") or re.fullmatch(r"-\d.*", token):
        return None
    return token.split("=", 1)[0]


# --- the checks -------------------------------------------------------------------------------


def _norm_uri(uri: str) -> str:
    from sidecar.modelsource import ModelSourceError, parse_model_uri

    try:
        return parse_model_uri(uri).uri
    except ModelSourceError:
        return uri


def _flag_accepted(framework: str, flag: str, image: str) -> bool:
    try:
        from webhook.frameworks import flag_accepted
    except ImportError as exc:  # the version table is part of the contract
        pytest.fail(f"webhook.frameworks.flag_accepted is missing ({exc}); flag {flag} added")
    return bool(flag_accepted(framework, flag, image))


def check_schema(pod: dict[str, Any]) -> None:
    validate_pod_strict(pod, SCHEMA_VERSIONS)
    assert api_server_violations(pod) == []


def check_common(exp: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """What holds for every pod, injected or not."""
    before_env = {c["name"]: _env(c) for c in _containers(before)}
    for c in _containers(after):
        env = _env(c)
        for switch in OFFLINE_SWITCHES:
            if switch in env:
                assert env[switch] == before_env.get(c["name"], {}).get(switch), (
                    f"container {c['name']}: offline switch {switch} added"
                )
        for token in argv_tokens(c):
            assert _flag_name(token) not in NEVER_ADDED_FLAGS, f"{c['name']}: {token} present"
    # flags that were not in the container before must be known to its image's version
    before_by_name = {c["name"]: c for c in _containers(before)}
    for c in _containers(after):
        old = before_by_name.get(c["name"])
        if old is None:
            continue
        old_flags = {_flag_name(t) for t in argv_tokens(old)}
        for token in argv_tokens(c):
            flag = _flag_name(token)
            if flag and flag not in old_flags:
                framework = exp.get("framework")
                assert framework, f"{c['name']}: flag {flag} added, no framework to check it"
                assert _flag_accepted(framework, flag, str(c.get("image"))), (
                    f"{c['name']}: added flag {flag} refused by {framework} {c.get('image')}"
                )


def _status(pod: dict[str, Any]) -> dict[str, Any]:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(ANN_STATUS)
    assert isinstance(raw, str), "no modelcache.io/status annotation"
    status: dict[str, Any] = json.loads(raw)
    return status


def check_injected(
    exp: dict[str, Any], before: dict[str, Any], after: dict[str, Any], warnings: list[str]
) -> None:
    meta = after.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    assert labels.get(LABEL_INJECTED) == "true", "not injected"
    assert ANN_SKIPPED not in annotations, f"skipped: {annotations.get(ANN_SKIPPED)}"
    status = _status(after)
    assert status.get("version") == 2, f"status version {status.get('version')}"
    assert set(status) >= STATUS_KEYS, f"status lacks {sorted(STATUS_KEYS - set(status))}"
    uris = [m["uri"] for m in status["models"]]
    assert uris == [_norm_uri(u) for u in exp["models"]], "models"
    for m in status["models"]:
        assert {"name", "uri", "cacheKey"} <= set(m), m
    if "containers" in exp:
        assert status["containers"] == exp["containers"]
    # delivery: recorded in the status and mounted where the status says
    volumes = {v["name"]: v for v in (after.get("spec") or {}).get("volumes") or []}
    for want in exp.get("delivery") or []:
        # hub-cache entries may name the hub directory (the model is in `model`) or the
        # model's own directory below it
        paths = {want["path"]}
        if want["mode"] == "hub-cache":
            paths.add(want["path"].rsplit("/", 1)[0])
        entries = [
            d
            for d in status["delivery"]
            if d.get("container") == want["container"]
            and d.get("mode") == want["mode"]
            and d.get("path") in paths
            and ("model" not in want or d.get("model") == want["model"])
        ]
        assert entries, f"delivery {want} not in {status['delivery']}"
        mounts = _container(after, want["container"]).get("volumeMounts") or []
        if want["mode"] == "hub-cache":
            leaf = want["path"].rsplit("/", 1)[-1]
            hits = [m for m in mounts if m.get("mountPath") == want["path"]]
            assert hits, f"{want['container']}: nothing mounted at {want['path']}"
            assert hits[0].get("subPath") == leaf, hits[0]
            assert hits[0].get("name") == "modelcache-hub", hits[0]
            assert "emptyDir" in volumes.get("modelcache-hub", {}), "modelcache-hub not an emptyDir"
        else:
            assert any(
                str(m.get("name", "")).startswith("modelcache-")
                and (
                    want["path"] == m.get("mountPath")
                    or want["path"].startswith(str(m.get("mountPath")).rstrip("/") + "/")
                )
                for m in mounts
            ), f"{want['container']}: {want['path']} is not under a modelcache mount"
    for name in exp.get("argv_unchanged") or []:
        old, new = _container(before, name), _container(after, name)
        assert (new.get("command"), new.get("args")) == (old.get("command"), old.get("args")), name
    for name in exp.get("untouched") or []:
        assert _container(after, name) == _container(before, name), f"{name} was changed"
    app_names = [c["name"] for c in _containers(before)]
    app_text = json.dumps(
        [
            [c.get("command"), c.get("args"), c.get("env")]
            for c in _containers(after)
            if c["name"] in app_names
        ]
    )
    for ref in exp.get("hub_refs") or []:
        assert json.dumps(ref)[1:-1] in app_text, f"reference {ref!r} no longer in the pod"
    for name, values in (exp.get("env_set") or {}).items():
        env = _env(_container(after, name))
        for key, value in values.items():
            assert env.get(key, {}).get("value") == value, f"{name}: {key}={env.get(key)}"
    for name, keys in (exp.get("env_absent") or {}).items():
        env = _env(_container(after, name))
        for key in keys:
            assert key not in env or key in _env(_container(before, name)), f"{name}: {key} added"
    # env the user wrote stays as written
    for c in _containers(before):
        new_env = _env(_container(after, c["name"]))
        for key, entry in _env(c).items():
            assert new_env.get(key) == entry, f"{c['name']}: env {key} changed"
    if "model_flag" in exp:
        want = exp["model_flag"]
        framework = exp["framework"]
        c = _container(after, want["container"])
        refs = model_references(framework, c)
        assert refs == [want["value"]], f"{want['container']}: model references {refs}"
        if framework == "llama.cpp":
            tokens = argv_tokens(c)
            assert [f for f, _ in _flag_values(tokens, MODEL_FLAGS["llama.cpp"])] in (
                ["-m"],
                ["--model"],
            ), tokens
        served = want.get("served_flag")
        if served:
            names = [v for _, v in _flag_values(argv_tokens(c), (served,))]
            assert names, f"{want['container']}: no {served}"
            if "served_value" in want:
                assert names == [want["served_value"]], f"{served} {names}"
    if "warmup_include" in exp:
        globs = warmup_globs(after, status)
        assert globs, "the warm-up fetches the whole repository"
        for name in exp["warmup_include"].get("matches") or []:
            assert any(fnmatch.fnmatchcase(name, g) for g in globs), f"{name} not warmed: {globs}"
        for name in exp["warmup_include"].get("excludes") or []:
            assert not any(fnmatch.fnmatchcase(name, g) for g in globs), f"{name} warmed: {globs}"
    for key, regex in (exp.get("annotations") or {}).items():
        assert re.search(regex, str(annotations.get(key, ""))), f"annotation {key}"
    for regex in exp.get("warnings") or []:
        assert any(re.search(regex, w) for w in warnings), f"no warning matching {regex!r}"
    check_credentials(before, after, status)
    check_init_order(after)
    # PodSecurity: what the webhook adds meets restricted; the pod keeps the level it met
    assert [str(v) for v in added_violations(before, after)] == []


def warmup_globs(after: dict[str, Any], status: dict[str, Any]) -> list[str]:
    """The file globs the node side fetches (the csi volumes' ``include`` attribute)."""
    for v in (after.get("spec") or {}).get("volumes") or []:
        if v.get("name") == "modelcache-models":
            return [g for g in v["csi"]["volumeAttributes"].get("include", "").split(",") if g]
    return []


#: the credential variables each scheme's source reads (what the node side must receive)
SCHEME_CREDENTIALS = {
    "hf": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
}


def check_credentials(
    before: dict[str, Any], after: dict[str, Any], status: dict[str, Any]
) -> None:
    """Our containers carry no credentials; the node side receives the app's own Secret
    through the csi volumes' ``nodePublishSecretRef`` (``credentialKeys`` naming the keys
    that differ from the variables)."""
    ours = [
        c for c in _containers(after) if c["name"] in ("modelcache-warmup", "modelcache-sidecar")
    ]
    assert ours, "no modelcache-warmup or modelcache-sidecar container"
    for c in ours:
        assert "envFrom" not in c, f"{c['name']}: envFrom in our container"
        names = [e["name"] for e in c.get("env") or []]
        assert not [n for n in names if CREDENTIAL_ENV.match(n)], (
            f"{c['name']}: credentials {names}"
        )
    volumes = {v["name"]: v for v in (after.get("spec") or {}).get("volumes") or []}
    csi = [volumes[n]["csi"] for n in ("modelcache-models", "modelcache-fuse")]
    secrets = {(v.get("nodePublishSecretRef") or {}).get("name") for v in csi}
    keys = {v["volumeAttributes"].get("credentialKeys", "") for v in csi}
    assert len(secrets) == 1 and len(keys) == 1, "the two csi volumes differ in credentials"
    (secret,), (credential_keys,) = secrets, keys
    wanted = {
        var
        for m in status["models"]
        for var in SCHEME_CREDENTIALS.get(m["uri"].split("://", 1)[0], ())
    }
    delivered = {d["container"] for d in status["delivery"]}
    for name in delivered:
        app = _container(before, name)
        for var, entry in _env(app).items():
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if var not in wanted or not ref:
                continue
            assert secret == ref["name"], f"{var} comes from {ref['name']}, node gets {secret}"
            if ref["key"] != var:
                assert f"{var}={ref['key']}" in credential_keys.split(","), credential_keys
        for src in app.get("envFrom") or []:
            if "secretRef" in src and not (set(_env(app)) & wanted):
                assert secret == src["secretRef"]["name"], f"envFrom Secret, node gets {secret}"


def check_init_order(after: dict[str, Any]) -> None:
    names = [c["name"] for c in (after.get("spec") or {}).get("initContainers") or []]
    ours = [i for i, n in enumerate(names) if n.startswith("modelcache-")]
    users = [
        i for i, n in enumerate(names) if not n.startswith("modelcache-") and n not in MESH_INIT
    ]
    if ours and users:
        assert max(ours) < min(users), f"modelcache init containers after user ones: {names}"


def check_skipped(
    exp: dict[str, Any], before: dict[str, Any], after: dict[str, Any], warnings: list[str]
) -> None:
    meta = after.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    assert (meta.get("labels") or {}).get(LABEL_INJECTED) is None, "injected, expected skipped"
    assert ANN_STATUS not in annotations, "status written on a skipped pod"
    reason = annotations.get(ANN_SKIPPED)
    assert isinstance(reason, str) and reason, "no modelcache.io/skipped annotation"
    assert re.search(exp["reason"], reason, re.IGNORECASE), f"reason {reason!r}"
    assert after.get("spec") == before.get("spec"), "a skipped pod's spec changed"
    assert any(f"not injected: {reason}" in w for w in warnings), (
        f"no 'not injected: {reason}' warning in {warnings}"
    )


def check_slot(
    exp: dict[str, Any], before: dict[str, Any], after: dict[str, Any], warnings: list[str]
) -> None:
    check_common(exp, before, after)
    if exp["injected"]:
        check_injected(exp, before, after, warnings)
    else:
        check_skipped(exp, before, after, warnings)


# --- tests: the corpus itself -----------------------------------------------------------------


def test_corpus_size_and_expectations() -> None:
    assert len(CASES) >= 28
    assert sorted(EXPECTED) == CASES, "every case has expectations and every expectation a case"
    for case in CASES:
        first = _input(case).splitlines()[0]
        assert first.startswith("# Source: "), f"{case}: first line must name the source"
        exp = EXPECTED[case]
        assert set(exp) <= CASE_FIELDS, f"{case}: unknown fields {set(exp) - CASE_FIELDS}"
        assert exp.get("source"), case
        assert set(exp.get("pending") or {}) <= {"inject", "server"}, case
        doc_slots = set(slots(workload(_docs(_input(case)))))
        assert set(slot_expectations(case)) == doc_slots, case
        for name, slot in slot_expectations(case).items():
            assert set(slot) <= SLOT_FIELDS | {"framework"}, (case, name)
            assert ("models" in slot) == slot["injected"], (case, name)
            assert ("reason" in slot) == (not slot["injected"]), (case, name)


def test_no_unused_golden_files() -> None:
    if UPDATE:
        pytest.skip("regenerating golden files (MODELCACHE_UPDATE_GOLDEN=1)")
    unused = sorted(
        p.name
        for p in CORPUS_DIR.glob("*.yaml.injected")
        if p.name[: -len(".yaml.injected")] not in CASES
    )
    assert unused == []
    stale = [c for c in CASES if (EXPECTED[c].get("pending") or {}).get("inject")]
    assert [c for c in stale if _golden(c).exists()] == [], "golden output of a pending case"


def test_docs_table_lists_every_case() -> None:
    text = DOCS_TABLE.read_text(encoding="utf-8")
    rows = {
        m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \|[^|]*\|([^|]*)\|", text, re.M)
    }
    assert sorted(rows) == CASES, "docs/corpus.md must list exactly the corpus cases"
    for case in CASES:
        outcomes = [e["injected"] for e in slot_expectations(case).values()]
        word = "injected" if all(outcomes) else "left alone" if not any(outcomes) else "injected"
        assert word in rows[case], f"{case}: docs say {rows[case].strip()!r}"


# --- tests: through inject --------------------------------------------------------------------


@pytest.mark.parametrize("case", _params("inject"))
def test_corpus_inject(case: str) -> None:
    text = _input(case)
    rc, out, err = inject(text)
    assert rc == 0, err
    warnings = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("Warning: ")]
    docs_in, docs_out = _docs(text), _docs(out)
    assert [d.get("kind") for d in docs_out] == [d.get("kind") for d in docs_in]
    for doc_in, doc_out in zip(docs_in, docs_out, strict=True):
        if not slots(doc_in):
            assert doc_out == doc_in, f"{doc_in.get('kind')} changed"
            assert doc_in.get("kind") in err, f"no stderr line naming kind {doc_in.get('kind')}"
        elif doc_in.get("kind") == LWS_KIND:
            rest_in, rest_out = copy.deepcopy(doc_in), copy.deepcopy(doc_out)
            for d in (rest_in, rest_out):
                d["spec"]["leaderWorkerTemplate"].pop("leaderTemplate", None)
                d["spec"]["leaderWorkerTemplate"].pop("workerTemplate", None)
            assert rest_out == rest_in, "LeaderWorkerSet fields outside the templates changed"
        if doc_out.get("kind") in SCHEMA_KINDS:
            validate_pod_strict(doc_out, SCHEMA_VERSIONS)
    before, after = slots(workload(docs_in)), slots(workload(docs_out))
    for name, exp in slot_expectations(case).items():
        check_schema(after[name])
        check_slot(exp, before[name], after[name], warnings)
    rc, again, _ = inject(out)
    assert rc == 0
    assert again == out, "a second inject pass changed the output"
    if UPDATE:
        _golden(case).write_text(out, encoding="utf-8")
        return
    if (EXPECTED[case].get("pending") or {}).get("inject"):
        pytest.fail("every check passes now: drop pending.inject and regenerate the golden file")
    assert _golden(case).exists(), "no golden file: run with MODELCACHE_UPDATE_GOLDEN=1"
    assert out == _golden(case).read_text(encoding="utf-8")


def test_corpus_through_the_cli() -> None:
    """``python -m webhook inject -f FILE`` on the whole corpus gives the same documents."""
    texts = [_input(case) for case in CASES]
    proc = subprocess.run(
        [sys.executable, "-m", "webhook", "inject", "-f", "-"],
        input="\n---\n".join(texts),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = [d for t in texts for d in _docs(inject(t)[1])]
    assert _docs(proc.stdout) == expected


# --- tests: through the HTTPS server ----------------------------------------------------------


@pytest.fixture(scope="module")
def https_webhook() -> Iterator[tuple[WebhookProcess, ssl.SSLContext]]:
    proc = start_webhook_process(["--dev"])
    try:
        ca = next(
            line.split(": ", 1)[1]
            for line in proc.stdout_lines
            if line.startswith("dev CA certificate: ")
        )
        yield proc, ssl.create_default_context(cafile=ca)
    finally:
        proc.stop()


def _admit(
    server: tuple[WebhookProcess, ssl.SSLContext], pod: dict[str, Any], namespace: str
) -> dict[str, Any]:
    proc, ctx = server
    request = urllib.request.Request(
        f"{proc.url}/mutate",
        data=json.dumps(make_review(pod, namespace=namespace)).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, context=ctx, timeout=30) as resp:
        assert resp.status == 200
        body = json.loads(resp.read())
    response: dict[str, Any] = body["response"]
    return response


def _apply(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "patch" not in response:
        return pod
    patch = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(pod), patch)
    return result


def controller_pod(doc: dict[str, Any], slot: str, template: dict[str, Any]) -> dict[str, Any]:
    """The pod the workload's controller creates from this template."""
    if doc["kind"] == "Pod":
        return copy.deepcopy(template)
    meta = copy.deepcopy(template.get("metadata") or {})
    meta.pop("namespace", None)
    owner = doc["metadata"]["name"]
    if doc["kind"] == LWS_KIND:
        size = str(doc["spec"]["leaderWorkerTemplate"].get("size", 1))
        index = "0" if slot == "leader" else "1"
        meta["name"] = f"{owner}-0" if slot == "leader" else f"{owner}-0-1"
        meta["labels"] = {
            **(meta.get("labels") or {}),
            "leaderworkerset.sigs.k8s.io/name": owner,
            "leaderworkerset.sigs.k8s.io/group-index": "0",
            "leaderworkerset.sigs.k8s.io/worker-index": index,
        }
        meta["annotations"] = {
            **(meta.get("annotations") or {}),
            "leaderworkerset.sigs.k8s.io/size": size,
            **(
                {"leaderworkerset.sigs.k8s.io/leader-name": f"{owner}-0"}
                if slot == "worker"
                else {}
            ),
        }
    else:
        meta.pop("name", None)
        meta["generateName"] = f"{owner}-5d8f7c9b4-"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": copy.deepcopy(template["spec"]),
    }


def _selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def check_not_sent(docs: list[Any], pod: dict[str, Any]) -> None:
    """No webhook of the shipped configuration selects this pod's namespace and labels."""
    namespace = next(d for d in docs if d.get("kind") == "Namespace")
    ns_labels = {
        **(namespace["metadata"].get("labels") or {}),
        "kubernetes.io/metadata.name": namespace["metadata"]["name"],
    }
    config = yaml.safe_load(
        (REPO / "manifests" / "core" / "mutatingwebhookconfiguration.yaml").read_text(
            encoding="utf-8"
        )
    )
    pod_labels = (pod.get("metadata") or {}).get("labels") or {}
    for hook in config["webhooks"]:
        called = _selector_matches(hook.get("namespaceSelector"), ns_labels) and _selector_matches(
            hook.get("objectSelector"), pod_labels
        )
        assert not called, f"webhook {hook['name']} is called for namespace {ns_labels}"


@pytest.mark.parametrize("case", _params("server"))
def test_corpus_through_the_server(
    https_webhook: tuple[WebhookProcess, ssl.SSLContext], case: str
) -> None:
    docs = _docs(_input(case))
    doc = workload(docs)
    namespace = (doc.get("metadata") or {}).get("namespace") or "default"
    cli_docs = _docs(inject(_input(case))[1])
    cli_slots = slots(workload(cli_docs))
    for name, template in slots(doc).items():
        exp = slot_expectations(case)[name]
        pod = controller_pod(doc, name, template)
        if (exp.get("server") or {}).get("not_sent"):
            check_not_sent(docs, pod)
            continue
        want = server_expectation(exp)
        response = _admit(https_webhook, pod, namespace)
        assert response["allowed"], response.get("status")
        patched = _apply(pod, response)
        check_schema(patched)
        check_slot(want, pod, patched, response.get("warnings") or [])
        if want["injected"] and exp["injected"] and "server" not in exp:
            cli = cli_slots[name]
            assert patched["spec"] == cli["spec"], "server and inject disagree on the spec"
            cli_meta, meta = cli.get("metadata") or {}, patched.get("metadata") or {}
            # what the webhook writes must agree; inject also copies the leader's models onto
            # a LeaderWorkerSet worker template as modelcache.io/model, the controller adds its
            # own annotations (LeaderWorkerSet size, ...)
            for key in (ANN_STATUS, ANN_SKIPPED):
                got = (meta.get("annotations") or {}).get(key)
                assert got == (cli_meta.get("annotations") or {}).get(key), f"{key} differs"
            assert (cli_meta.get("labels") or {}).items() <= (meta.get("labels") or {}).items()
        if not want["injected"] and not exp["injected"] and "server" not in exp:
            reason = (cli_slots[name].get("metadata") or {}).get("annotations", {}).get(ANN_SKIPPED)
            got = (patched.get("metadata") or {}).get("annotations", {}).get(ANN_SKIPPED)
            assert got == reason, "server and inject give different reasons"
        again = _admit(https_webhook, patched, namespace)
        assert _apply(patched, again) == patched, "a second admission changed the pod"
        # the pod made from the inject output (the user applied what inject printed)
        from_cli = controller_pod(doc, name, cli_slots[name])
        assert _apply(from_cli, _admit(https_webhook, from_cli, namespace)) == from_cli


# --- the checks catch what they are for ---------------------------------------------------------


def _tamper_offline(pod: dict[str, Any]) -> None:
    pod["spec"]["containers"][0].setdefault("env", []).append(
        {"name": "HF_HUB_OFFLINE", "value": "1"}
    )


def _tamper_argv(pod: dict[str, Any]) -> None:
    pod["spec"]["containers"][0]["args"] = [*pod["spec"]["containers"][0]["args"], "--x"]


def _tamper_flag(pod: dict[str, Any]) -> None:
    c = pod["spec"]["containers"][0]
    c["args"] = [c["args"][0] + " --safetensors-load-strategy prefetch"]


def _tamper_mount(pod: dict[str, Any]) -> None:
    c = pod["spec"]["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "modelcache-hub"]


def _tamper_credentials(pod: dict[str, Any]) -> None:
    for v in pod["spec"]["volumes"]:
        if v["name"] == "modelcache-fuse":
            v["csi"].pop("nodePublishSecretRef", None)


def _tamper_credential_env(pod: dict[str, Any]) -> None:
    pod["spec"]["initContainers"][0].setdefault("env", []).append(
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}
    )


def _tamper_privileged(pod: dict[str, Any]) -> None:
    pod["spec"]["initContainers"][-1]["securityContext"] = {"privileged": True}


def _tamper_status_models(pod: dict[str, Any]) -> None:
    status = json.loads(pod["metadata"]["annotations"][ANN_STATUS])
    status["models"][0]["uri"] = status["models"][0]["uri"].replace("@main", "@other")
    pod["metadata"]["annotations"][ANN_STATUS] = json.dumps(status)


@pytest.mark.parametrize(
    "tamper",
    [
        _tamper_offline,
        _tamper_argv,
        _tamper_flag,
        _tamper_mount,
        _tamper_credentials,
        _tamper_credential_env,
        _tamper_privileged,
        _tamper_status_models,
    ],
)
def test_checks_reject_a_broken_result(tamper: Any) -> None:
    """The checks fail on a result that breaks one rule (they would not pass anything)."""
    case = "vllm-docs-gpu-pvc-cache"
    before = slots(workload(_docs(_input(case))))["template"]
    after = slots(workload(_docs(inject(_input(case))[1])))["template"]
    (exp,) = slot_expectations(case).values()
    check_slot(exp, before, after, [])  # the real result passes
    broken = copy.deepcopy(after)
    tamper(broken)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_slot(exp, before, broken, [])
