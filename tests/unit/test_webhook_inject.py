"""Offline ``inject``: documents, workload kinds, errors; the real CLI once through stdin."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.podcheck import api_server_violations, validate_pod_strict
from webhook.config import Config
from webhook.inject import run_inject
from webhook.workloads import pod_slots

ROOT = Path(__file__).resolve().parents[2]
CFG = Config()
SPEC = {
    "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.8.5", "args": ["--model", "o/m"]}]
}


def run(text: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = run_inject(io.StringIO(text), out, err, CFG)
    return rc, out.getvalue(), err.getvalue()


def template_doc(kind: str, api: str = "apps/v1") -> dict[str, object]:
    template = {"metadata": {"labels": {"a": "b"}}, "spec": SPEC}
    if kind == "CronJob":
        spec: dict[str, object] = {
            "schedule": "* * * * *",
            "jobTemplate": {"spec": {"template": template}},
        }
    elif kind == "PodTemplate":
        return {"apiVersion": "v1", "kind": kind, "metadata": {"name": "t"}, "template": template}
    else:
        spec = {"selector": {"matchLabels": {"a": "b"}}, "template": template}
        if kind == "StatefulSet":
            spec["serviceName"] = "w"
        if kind == "Job":
            template["spec"] = {**SPEC, "restartPolicy": "Never"}
            del spec["selector"]
    return {"apiVersion": api, "kind": kind, "metadata": {"name": "w"}, "spec": spec}


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (template_doc("Deployment"), ["spec", "template"]),
        (template_doc("StatefulSet"), ["spec", "template"]),
        (template_doc("DaemonSet"), ["spec", "template"]),
        (template_doc("ReplicaSet"), ["spec", "template"]),
        (template_doc("Job", "batch/v1"), ["spec", "template"]),
        (template_doc("CronJob", "batch/v1"), ["spec", "jobTemplate", "spec", "template"]),
        (template_doc("PodTemplate"), ["template"]),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": SPEC}, []),
    ],
)
def test_every_workload_kind_is_injected(doc: dict[str, object], path: list[str]) -> None:
    rc, out, err = run(yaml.safe_dump(doc))
    assert rc == 0, err
    result = yaml.safe_load(out)
    node = result
    for key in path:
        node = node[key]
    assert node["metadata"]["labels"]["modelcache.io/injected"] == "true"
    assert [c["name"] for c in node["spec"]["initContainers"]] == [
        "modelcache-warmup",
        "modelcache-sidecar",
    ]
    assert f"{doc['kind']}/" in err
    validate_pod_strict(result)
    assert api_server_violations(node) == []


def test_other_kinds_and_lists_pass_through_or_recurse() -> None:
    text = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n---\n"
        "---\n"
        + yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
                    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": SPEC},
                ],
            }
        )
    )
    rc, out, _ = run(text)
    assert rc == 0
    svc, lst = yaml.safe_load_all(out)
    assert svc == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": {"ports": [{"port": 80}]},
    }
    assert lst["items"][0] == {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    assert "initContainers" in lst["items"][1]["spec"]


def test_a_denial_anywhere_writes_nothing_to_stdout() -> None:
    good = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ok"}, "spec": SPEC}
    bad = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad", "annotations": {"modelcache.io/sidecar": "ambient"}},
        "spec": SPEC,
    }
    rc, out, err = run(yaml.safe_dump_all([good, bad]))
    assert rc == 1
    assert out == ""
    assert "error: denied: Pod/bad: modelcache.io/sidecar: invalid value 'ambient'" in err


def test_invalid_yaml_is_a_user_error() -> None:
    rc, out, err = run("a: [\n")
    assert (rc, out) == (1, "")
    assert err.startswith("error: input is not valid YAML")


def test_namespace_of_the_document_is_honoured() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "kube-system"},
        "spec": SPEC,
    }
    rc, out, _ = run(yaml.safe_dump(doc))
    assert rc == 0
    assert yaml.safe_load(out) == doc


def test_pod_slots_ignore_malformed_workloads() -> None:
    docs = [
        {"kind": "Deployment", "spec": None},
        {"kind": "CronJob", "spec": {"jobTemplate": 3}},
        "text",
        None,
    ]
    assert [s for i in range(len(docs)) for s in pod_slots(docs, i)] == []


def test_real_cli_reads_stdin() -> None:
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": SPEC}
    result = subprocess.run(
        [sys.executable, "-m", "webhook", "inject", "-f", "-"],
        input=yaml.safe_dump(doc),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["metadata"]["labels"]["modelcache.io/injected"] == "true"
    assert "Warning: Pod/p: detected model" in result.stderr


LWS = """
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
metadata:
  name: vllm
spec:
  replicas: 1
  leaderWorkerTemplate:
    size: 2
    leaderTemplate:
      metadata:
        labels:
          role: leader
      spec:
        containers:
        - name: vllm-leader
          image: vllm/vllm-openai:v0.8.5
          command:
          - sh
          - -c
          - >-
            ray start --head --port=6379;
            vllm serve meta-llama/Llama-3.1-405B-Instruct --pipeline-parallel-size 2
            --distributed-executor-backend ray
    workerTemplate:
      spec:
        containers:
        - name: vllm-worker
          image: vllm/vllm-openai:v0.8.5
          command: ["sh", "-c", "ray start --address=$(LWS_LEADER_ADDRESS):6379 --block"]
---
apiVersion: v1
kind: Service
metadata:
  name: vllm
spec:
  ports: [{port: 8000}]
"""


def test_leaderworkerset_pods_get_the_same_model_at_the_same_place() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_inject(io.StringIO(LWS), out, err, Config()) == 0, err.getvalue()
    lws, service = yaml.safe_load_all(out.getvalue())
    lwt = lws["spec"]["leaderWorkerTemplate"]
    leader, worker = lwt["leaderTemplate"], lwt["workerTemplate"]
    statuses = [
        json.loads(t["metadata"]["annotations"]["modelcache.io/status"]) for t in (leader, worker)
    ]
    assert statuses[0]["models"] == statuses[1]["models"]
    assert [d["path"] for d in statuses[0]["delivery"]] == [
        d["path"] for d in statuses[1]["delivery"]
    ]
    assert worker["metadata"]["annotations"]["modelcache.io/model"] == (
        "Llama-3.1-405B-Instruct=hf://meta-llama/Llama-3.1-405B-Instruct@main"
    )
    # the leader's command line is untouched: its Ray workers load the same Hub id
    assert leader["spec"]["containers"][0]["command"][2].startswith("ray start --head")
    assert worker["spec"]["containers"][0]["command"][2].startswith("ray start --address")
    assert (
        "vllm serve meta-llama/Llama-3.1-405B-Instruct"
        in leader["spec"]["containers"][0]["command"][2]
    )
    assert service["kind"] == "Service"
    assert "Service/vllm: passed through unchanged" in err.getvalue()
