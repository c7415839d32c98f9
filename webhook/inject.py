"""``python -m webhook inject -f FILE|-``: the admission mutation, offline, on YAML.

Multi-document YAML in, YAML out; every pod and pod template goes through the same
``mutate_pod`` the server calls. Warnings go to stderr (one line each, prefixed like
kubectl's). A user error (a denial) prints the message to stderr, nothing to stdout, and
returns 1: a half-injected manifest is never written.
"""

from __future__ import annotations

import copy
from typing import Any, TextIO

import yaml

from webhook.annotations import ANN_MODEL, ANN_STATUS
from webhook.config import Config
from webhook.mutations.status import read_status
from webhook.pipeline import mutate_pod, skip_pod
from webhook.workloads import PodSlot, describe, is_workload, pod_slots


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings (sh -c scripts) as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(docs: list[Any]) -> str:
    return yaml.dump_all(
        docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096
    )


def inject_documents(docs: list[Any], config: Config) -> tuple[list[Any], list[str], str | None]:
    """Mutate every pod slot of every document; returns (docs, warnings, denial message)."""
    warnings: list[str] = []
    box = list(docs)
    # csi: everything injected meets PodSecurity restricted, so no namespace is skipped
    guarded = _pod_security_guarded(box) if config.node_cache == "hostPath" else {}
    for i in range(len(box)):
        if not is_workload(box[i]):
            warnings.append(
                f"{describe(box[i]) if isinstance(box[i], dict) else type(box[i]).__name__}: "
                "passed through unchanged (not a pod or a workload with a pod template)"
            )
            continue
        leader_models: str | None = None
        for slot in list(pod_slots(box, i)):
            if slot.group == "worker" and leader_models:
                _give_models(slot, leader_models)
            if slot.namespace in guarded:
                skipped, result = skip_pod(
                    slot.pod,
                    f"namespace {slot.namespace} enforces PodSecurity {guarded[slot.namespace]}, "
                    "which the privileged sidecar of nodeCache hostPath does not meet (the "
                    "webhook configuration skips such namespaces)",
                )
                warnings += [f"{slot.owner}: {w}" for w in result.warnings]
                slot.replace(skipped)
                continue
            mutated, result = mutate_pod(
                slot.pod, namespace=slot.namespace, config=config, group=slot.group
            )
            if slot.group == "leader" and result.decision == "injected":
                leader_models = _models_of(mutated)
            warnings += [f"{slot.owner}: {w}" for w in result.warnings]
            if not result.allowed:
                return docs, warnings, f"{slot.owner}: {result.message}"
            if result.patch:
                slot.replace(mutated)
    return box, warnings, None


#: PodSecurity levels a pod injected with ``nodeCache: hostPath`` does not meet (that
#: mode's webhook configuration skips namespaces that enforce them).
_GUARDED_LEVELS = ("baseline", "restricted")


def _pod_security_guarded(docs: list[Any]) -> dict[str, str]:
    """Namespaces in the input that enforce a PodSecurity level the injected pod fails."""
    out: dict[str, str] = {}
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "Namespace":
            continue
        meta = doc.get("metadata") or {}
        level = (meta.get("labels") or {}).get("pod-security.kubernetes.io/enforce")
        if isinstance(meta.get("name"), str) and level in _GUARDED_LEVELS:
            out[meta["name"]] = str(level)
    return out


def _models_of(pod: dict[str, Any]) -> str | None:
    """The ``name=uri`` list of an injected pod, from its status."""
    status = read_status((pod.get("metadata") or {}).get("annotations"))
    if status is None or not status.models:
        return None
    return ",".join(m.to_arg() for m in status.models)


def _give_models(slot: PodSlot, models: str) -> None:
    """A LeaderWorkerSet's workers get the leader's models at the same place: the same
    ``modelcache.io/model`` (unless the worker template names its own)."""
    pod = copy.deepcopy(slot.pod)
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        meta = pod["metadata"] = {}
    annotations = meta.get("annotations")
    if not isinstance(annotations, dict):
        annotations = meta["annotations"] = {}
    if ANN_MODEL in annotations or ANN_STATUS in annotations:
        return
    annotations[ANN_MODEL] = models
    slot.replace(pod)


def run_inject(src: TextIO, out: TextIO, err: TextIO, config: Config) -> int:
    """The ``inject`` command body: 0 on success, 1 on a user error (printed to err)."""
    try:
        docs = [d for d in yaml.safe_load_all(src.read()) if d is not None]
    except yaml.YAMLError as exc:
        err.write(f"error: input is not valid YAML: {exc}\n")
        return 1
    result, warnings, denial = inject_documents(docs, config)
    for w in warnings:
        err.write(f"Warning: {w}\n")
    if denial is not None:
        err.write(f"error: denied: {denial}\n")
        return 1
    if result:
        out.write(dump_yaml(result))
    return 0
