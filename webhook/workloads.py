"""Finding the pod (template) inside a Kubernetes object, for the offline ``inject``.

Pod → the object itself; Deployment, StatefulSet, DaemonSet, ReplicaSet,
ReplicationController, Job → ``spec.template``; CronJob → ``spec.jobTemplate.spec.template``;
PodTemplate → ``template``; LeaderWorkerSet → ``spec.leaderWorkerTemplate.leaderTemplate``
(when set) then ``workerTemplate``; List → every item. A template has the shape of a pod
(``metadata`` + ``spec``), so the same pipeline mutates both. Other kinds pass through, and
``inject`` names them on stderr.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

TEMPLATE_PATHS: Final[dict[str, tuple[str, ...]]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "PodTemplate": ("template",),
}


LWS_KIND: Final = "LeaderWorkerSet"


@dataclass(frozen=True)
class PodSlot:
    """Where a pod (or pod template) lives: ``parent[key]`` (a dict, or the items list of a
    List), plus its owner for messages and its namespace. ``group`` is set for the pods of a
    multi-node group (``leader`` / ``worker`` of a LeaderWorkerSet)."""

    parent: Any
    key: Any
    owner: str  # "Deployment/vllm"
    namespace: str | None
    group: str | None = None

    @property
    def pod(self) -> dict[str, Any]:
        value: dict[str, Any] = self.parent[self.key]
        return value

    def replace(self, pod: dict[str, Any]) -> None:
        self.parent[self.key] = pod


def describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "")
    return f"{obj.get('kind', '?')}/{name or '(unnamed)'}"


def pod_slots(parent: Any, key: Any) -> Iterator[PodSlot]:
    """Every pod slot in ``parent[key]`` (a document, or an item of a List)."""
    obj = parent[key]
    if not isinstance(obj, dict):
        return
    kind = obj.get("kind")
    meta = obj.get("metadata")
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    ns = ns if isinstance(ns, str) and ns else None
    if kind == "Pod":
        yield PodSlot(parent, key, describe(obj), ns)
        return
    if isinstance(kind, str) and kind.endswith("List") and isinstance(obj.get("items"), list):
        items: list[Any] = obj["items"]
        for i in range(len(items)):
            yield from pod_slots(items, i)
        return
    if kind == LWS_KIND:
        lwt = (obj.get("spec") or {}).get("leaderWorkerTemplate")
        if isinstance(lwt, dict):
            for tkey, role in (("leaderTemplate", "leader"), ("workerTemplate", "worker")):
                if isinstance(lwt.get(tkey), dict):
                    yield PodSlot(lwt, tkey, f"{describe(obj)}[{role}]", ns, role)
        return
    path = TEMPLATE_PATHS.get(str(kind))
    if path is None:
        return
    holder: Any = obj
    for part in path[:-1]:
        holder = holder.get(part) if isinstance(holder, dict) else None
    if isinstance(holder, dict) and isinstance(holder.get(path[-1]), dict):
        yield PodSlot(holder, path[-1], describe(obj), ns)


def is_workload(obj: Any) -> bool:
    """Whether ``inject`` looks inside this document (else it passes through unchanged)."""
    if not isinstance(obj, dict):
        return False
    kind = obj.get("kind")
    return (
        kind in ("Pod", LWS_KIND)
        or kind in TEMPLATE_PATHS
        or (isinstance(kind, str) and kind.endswith("List"))
    )
