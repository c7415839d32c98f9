"""Event-driven pre-warm: what the node agent fetches before any pod asks for it.

Cron entries (``sidecar.prewarm``) warm what an admin knows in advance. This module adds the
two signals a cluster gives before a cold start hurts:

1. **A pod bound to this node.** The scheduler sets ``spec.nodeName`` seconds before the
   kubelet has pulled the images (often a multi-GB inference image); an injected pod
   (label ``modelcache.io/injected: "true"``) names its models in its
   ``modelcache.io/status`` annotation. :func:`bound_pods` finds those that are bound here and
   not running yet, and the agent starts fetching their models at once, with the node's own
   credentials (the agent's environment). A private model the node cannot read fails here
   (logged, retried with back-off) and is fetched at publish time with the pod's own Secret,
   as without this watcher: pre-warm never widens who can read what.
2. **A workload that wants more replicas than there are warm nodes.** A Deployment,
   StatefulSet, LeaderWorkerSet or HorizontalPodAutoscaler annotated
   ``modelcache.io/prewarm: "true"`` (on the workload's own metadata, never on the pod
   template) names its models in its pod template's ``modelcache.io/model`` annotation, or
   else through the status annotation of one of its pods. When its desired pod count is
   larger than the number of nodes labelled ``cache.modelcache.io/<key>=ready`` for all of
   its models, :func:`plan_scale_out` picks the nodes the new pods most likely land on:
   schedulable nodes that match the template's ``nodeSelector`` and required node affinity,
   whose taints the template tolerates and whose allocatable GPUs (any extended resource
   named ``*/gpu``) minus what the pods already there request fit one pod; among them the
   ones with the most free GPUs first (the scheduler's default scoring spreads onto emptier
   nodes), then by name. The new pods prefer warm nodes (the webhook's affinity), so exactly
   ``desired - holders`` cold nodes are chosen.

There is no leader: every agent computes the same plan from the same objects (the order is
total) and warms itself when it is in it, so nothing but the agents runs, and a node only
ever fills its own cache. A node that is warming keeps its place in the plan (it is not yet
labelled, and the order does not change), so the plan is stable while it converges.

Everything here but :class:`ClusterReader` is pure: objects in, decisions out.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_arg, parse_model_spec

log = logging.getLogger(__name__)

Obj = dict[str, Any]

#: On a Deployment, StatefulSet, LeaderWorkerSet or HPA: pre-warm the nodes its new pods
#: will land on.
PREWARM_ANNOTATION: Final = "modelcache.io/prewarm"
INJECTED_LABEL: Final = "modelcache.io/injected"
STATUS_ANNOTATION: Final = "modelcache.io/status"
MODEL_ANNOTATION: Final = "modelcache.io/model"
INCLUDE_ANNOTATION: Final = "modelcache.io/warmup-include"
LABEL_PREFIX: Final = "cache.modelcache.io/"
LABEL_READY: Final = "ready"
#: Taint effects that keep a pod off a node (PreferNoSchedule only scores).
_BLOCKING_EFFECTS: Final = ("NoSchedule", "NoExecute")
_DONE_PHASES: Final = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Wanted:
    """Models to warm on this node and why (``trigger``: ``pod`` or ``scale-out``)."""

    trigger: str
    reason: str
    models: tuple[NamedModel, ...]
    include: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """The models as ``name=uri,...`` (the pre-warm config's ``model`` form)."""
        return ",".join(m.to_arg() for m in self.models)


# --- pods ----------------------------------------------------------------------------------


def _dict(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``obj[key]`` when it is a mapping, else an empty one (objects from the API are raw)."""
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    ann = _meta(obj).get("annotations")
    return ann if isinstance(ann, dict) else {}


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = _meta(obj).get("labels")
    return labels if isinstance(labels, dict) else {}


def _ident(obj: Mapping[str, Any]) -> str:
    meta = _meta(obj)
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def status_models(pod: Mapping[str, Any]) -> tuple[list[NamedModel], tuple[str, ...]] | None:
    """The models (and include globs) the webhook wrote into the pod's status annotation;
    None when it has none or it cannot be read."""
    raw = _annotations(pod).get(STATUS_ANNOTATION)
    if not isinstance(raw, str):
        return None
    try:
        data = json.loads(raw)
        models = [
            parse_model_arg(f"{m['name']}={m['uri']}")
            for m in data.get("models") or []
            if isinstance(m, dict)
        ]
    except (ValueError, KeyError, TypeError, AttributeError, ModelSourceError):
        return None
    include = tuple(g for g in data.get("include") or [] if isinstance(g, str) and g)
    return (models, include) if models else None


def is_running(pod: Mapping[str, Any]) -> bool:
    """Past the point where pre-warm helps: running or done, or an app container started."""
    status = _dict(pod, "status")
    if status.get("phase") not in (None, "Pending"):
        return True
    return any(
        isinstance(c, dict) and isinstance(c.get("state"), dict) and "running" in c["state"]
        for c in status.get("containerStatuses") or []
    )


def bound_pods(pods: Iterable[Obj], node: str) -> list[Obj]:
    """Injected pods bound to ``node`` that are not running yet and not being deleted."""
    out = []
    for pod in pods:
        spec = _dict(pod, "spec")
        if spec.get("nodeName") != node or _labels(pod).get(INJECTED_LABEL) != "true":
            continue
        if _meta(pod).get("deletionTimestamp") or is_running(pod):
            continue
        out.append(pod)
    return out


def wanted_for_pods(pods: Iterable[Obj], node: str) -> list[Wanted]:
    """What the injected pods bound to ``node`` need, one entry per pod with models."""
    out = []
    for pod in bound_pods(pods, node):
        found = status_models(pod)
        if found is None:
            continue
        models, include = found
        out.append(Wanted("pod", f"pod {_ident(pod)} bound to {node}", tuple(models), include))
    return out


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 time of the API (``2026-01-02T03:04:05Z``), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def pod_start(pod: Mapping[str, Any]) -> datetime | None:
    """When the kubelet started the pod (``status.startTime``: before images are pulled and
    before the warm-up runs): the moment a pre-warmed model had to be ready by."""
    status = _dict(pod, "status")
    return parse_time(status.get("startTime"))


# --- workloads -----------------------------------------------------------------------------


@dataclass
class Workload:
    """An opted-in workload: how many pods it wants, their template and their models."""

    kind: str
    namespace: str
    name: str
    desired: int
    template: Obj
    models: list[NamedModel] = field(default_factory=list)
    include: tuple[str, ...] = ()

    @property
    def ident(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def _opted_in(obj: Mapping[str, Any]) -> bool:
    return str(_annotations(obj).get(PREWARM_ANNOTATION, "")).lower() == "true"


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _template_of(obj: Mapping[str, Any]) -> Obj:
    spec = _dict(obj, "spec")
    template = spec.get("template")
    return template if isinstance(template, dict) else {}


def _selector_matches(selector: Any, labels: Mapping[str, Any]) -> bool:
    if not isinstance(selector, dict):
        return False
    match = selector.get("matchLabels") or {}
    if not match and not selector.get("matchExpressions"):
        return False  # an empty selector would match every pod
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    return all(_expression_matches(e, labels) for e in selector.get("matchExpressions") or [])


def _expression_matches(expr: Any, labels: Mapping[str, Any]) -> bool:
    if not isinstance(expr, dict):
        return False
    key, op = str(expr.get("key")), expr.get("operator")
    values = [str(v) for v in expr.get("values") or []]
    present = key in labels
    value = str(labels.get(key, ""))
    if op == "In":
        return present and value in values
    if op == "NotIn":
        return not present or value not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and values:
        try:
            n, bound = int(value), int(values[0])
        except ValueError:
            return False
        return n > bound if op == "Gt" else n < bound
    return False


def _models_of(
    template: Mapping[str, Any], selector: Any, namespace: str, pods: Sequence[Obj]
) -> tuple[list[NamedModel], tuple[str, ...]]:
    """The template's ``modelcache.io/model``, else what the webhook wrote on one of the
    workload's pods."""
    ann = _annotations(template)
    spec = ann.get(MODEL_ANNOTATION)
    include = tuple(g.strip() for g in str(ann.get(INCLUDE_ANNOTATION, "")).split(",") if g.strip())
    if isinstance(spec, str) and spec.strip():
        try:
            return parse_model_spec(spec), include
        except ModelSourceError as exc:
            log.warning("pre-warm: %s=%r cannot be read: %s", MODEL_ANNOTATION, spec, exc)
            return [], ()
    for pod in pods:
        if _meta(pod).get("namespace") == namespace and _selector_matches(selector, _labels(pod)):
            found = status_models(pod)
            if found is not None:
                return found
    return [], ()


def collect_workloads(
    *,
    deployments: Sequence[Obj] = (),
    statefulsets: Sequence[Obj] = (),
    leaderworkersets: Sequence[Obj] = (),
    hpas: Sequence[Obj] = (),
    pods: Sequence[Obj] = (),
) -> list[Workload]:
    """Every opted-in workload with its desired pod count. An opted-in HPA stands for its
    target (Deployment or StatefulSet, opted in or not) with ``status.desiredReplicas``."""
    targets: dict[tuple[str, str, str], Obj] = {}
    for kind, objs in (("Deployment", deployments), ("StatefulSet", statefulsets)):
        for obj in objs:
            meta = _meta(obj)
            targets[(kind, str(meta.get("namespace")), str(meta.get("name")))] = obj
    desired: dict[tuple[str, str, str], int] = {}
    for key, obj in targets.items():
        if _opted_in(obj):
            spec = _dict(obj, "spec")
            desired[key] = _int(spec.get("replicas"), 1)
    for hpa in hpas:
        if not _opted_in(hpa):
            continue
        spec = _dict(hpa, "spec")
        status = _dict(hpa, "status")
        ref = _dict(spec, "scaleTargetRef")
        key = (str(ref.get("kind")), str(_meta(hpa).get("namespace")), str(ref.get("name")))
        if key not in targets:
            log.info("pre-warm: HPA %s targets %s %s, not found", _ident(hpa), key[0], key[2])
            continue
        want = _int(status.get("desiredReplicas"), _int(spec.get("minReplicas"), 1))
        desired[key] = max(desired.get(key, 0), want)
    out = []
    for key, count in sorted(desired.items()):
        obj = targets[key]
        template = _template_of(obj)
        spec = _dict(obj, "spec")
        models, include = _models_of(template, spec.get("selector"), key[1], pods)
        out.append(Workload(key[0], key[1], key[2], count, template, models, include))
    for lws in leaderworkersets:
        if not _opted_in(lws):
            continue
        spec = _dict(lws, "spec")
        lwt = spec.get("leaderWorkerTemplate")
        lwt = lwt if isinstance(lwt, dict) else {}
        template = lwt.get("workerTemplate") or lwt.get("leaderTemplate") or {}
        size = _int(lwt.get("size"), 1)
        meta = _meta(lws)
        ns, name = str(meta.get("namespace")), str(meta.get("name"))
        # every pod of every group (leader and workers) loads the model
        selector = {"matchLabels": {"leaderworkerset.sigs.k8s.io/name": name}}
        models, include = _models_of(template, selector, ns, pods)
        count = _int(spec.get("replicas"), 1) * max(1, size)
        out.append(Workload("LeaderWorkerSet", ns, name, count, template, models, include))
    return out


# --- placement -----------------------------------------------------------------------------


def _quantity(value: Any) -> float:
    """A resource quantity as a number (GPUs are whole numbers; ``1k``/``500m`` tolerated)."""
    text = str(value).strip()
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024.0, "Mi": 1024.0**2}
    for suffix, factor in sorted(suffixes.items(), key=lambda s: -len(s[0])):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * factor
            except ValueError:
                return 0.0
    try:
        return float(text)
    except ValueError:
        return 0.0


def _is_gpu(resource: str) -> bool:
    return resource.endswith("/gpu")


def pod_gpus(pod_spec: Mapping[str, Any]) -> dict[str, float]:
    """GPUs one pod requests: the sum over its containers, or the largest init container
    (a limit stands for the request when only the limit is set, as the API server does)."""

    def of(container: Any) -> dict[str, float]:
        res = container.get("resources") if isinstance(container, dict) else None
        res = res if isinstance(res, dict) else {}
        out: dict[str, float] = {}
        for part in ("limits", "requests"):  # requests win when both are set
            for name, value in (res.get(part) or {}).items():
                if _is_gpu(str(name)):
                    out[str(name)] = _quantity(value)
        return out

    total: dict[str, float] = {}
    for c in pod_spec.get("containers") or []:
        for name, n in of(c).items():
            total[name] = total.get(name, 0.0) + n
    for c in pod_spec.get("initContainers") or []:
        for name, n in of(c).items():
            total[name] = max(total.get(name, 0.0), n)
    return total


def _tolerated(taint: Mapping[str, Any], tolerations: Sequence[Any]) -> bool:
    for tol in tolerations:
        if not isinstance(tol, dict):
            continue
        if tol.get("effect") not in (None, "", taint.get("effect")):
            continue
        key = tol.get("key")
        if tol.get("operator") == "Exists":
            if key in (None, "") or key == taint.get("key"):
                return True
        elif key == taint.get("key") and str(tol.get("value", "")) == str(taint.get("value", "")):
            return True
    return False


def _term_matches(term: Any, node: Mapping[str, Any]) -> bool:
    if not isinstance(term, dict):
        return False
    labels = _labels(node)
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False  # an empty term matches nothing
    if not all(_expression_matches(e, labels) for e in exprs):
        return False
    return all(_expression_matches(f, {"metadata.name": _meta(node).get("name")}) for f in fields)


def node_fit(
    node: Mapping[str, Any], pod_spec: Mapping[str, Any], used_gpus: Mapping[str, float]
) -> str:
    """Why a pod with ``pod_spec`` cannot land on ``node`` ("" when it can)."""
    spec = _dict(node, "spec")
    if spec.get("unschedulable"):
        return "unschedulable"
    labels = _labels(node)
    for key, value in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return f"nodeSelector {key}={value}"
    affinity = (pod_spec.get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms")
    if terms and not any(_term_matches(t, node) for t in terms):
        return "required node affinity"
    tolerations = pod_spec.get("tolerations") or []
    for taint in spec.get("taints") or []:
        if (
            isinstance(taint, dict)
            and taint.get("effect") in _BLOCKING_EFFECTS
            and not _tolerated(taint, tolerations)
        ):
            return f"taint {taint.get('key')}:{taint.get('effect')}"
    status = _dict(node, "status")
    allocatable = status.get("allocatable") or {}
    for name, need in pod_gpus(pod_spec).items():
        free = _quantity(allocatable.get(name, 0)) - used_gpus.get(name, 0.0)
        if free < need:
            return f"{name}: {free:g} free, {need:g} needed"
    return ""


def gpus_in_use(pods: Iterable[Obj]) -> dict[str, dict[str, float]]:
    """GPUs requested by the pods on each node (pods that ended hold none)."""
    used: dict[str, dict[str, float]] = {}
    for pod in pods:
        spec = _dict(pod, "spec")
        status = _dict(pod, "status")
        node = spec.get("nodeName")
        if not node or status.get("phase") in _DONE_PHASES:
            continue
        per = used.setdefault(str(node), {})
        for name, n in pod_gpus(spec).items():
            per[name] = per.get(name, 0.0) + n
    return used


def holds(node: Mapping[str, Any], keys: Iterable[str]) -> bool:
    labels = _labels(node)
    return all(labels.get(LABEL_PREFIX + k) == LABEL_READY for k in keys)


@dataclass(frozen=True)
class ScalePlan:
    """The outcome for one workload: which nodes to warm and the numbers behind it."""

    workload: str
    desired: int
    holders: int
    candidates: int
    nodes: tuple[str, ...]


def plan_scale_out(workload: Workload, nodes: Sequence[Obj], pods: Sequence[Obj] = ()) -> ScalePlan:
    """The nodes to warm for ``workload`` (see the module docstring)."""
    keys = [m.source.cache_key for m in workload.models]
    holders = [n for n in nodes if holds(n, keys)] if keys else []
    need = workload.desired - len(holders)
    if not keys or need <= 0:
        return ScalePlan(workload.ident, workload.desired, len(holders), 0, ())
    pod_spec = workload.template.get("spec") if isinstance(workload.template, dict) else None
    pod_spec = pod_spec if isinstance(pod_spec, dict) else {}
    used = gpus_in_use(pods)
    wanted = pod_gpus(pod_spec)
    ranked = []
    for node in nodes:
        if holds(node, keys):
            continue
        name = str(_meta(node).get("name"))
        if node_fit(node, pod_spec, used.get(name, {})):
            continue
        status = _dict(node, "status")
        alloc = status.get("allocatable") or {}
        free = sum(_quantity(alloc.get(r, 0)) - used.get(name, {}).get(r, 0.0) for r in wanted)
        ranked.append((-free, name))
    ranked.sort()
    chosen = tuple(name for _, name in ranked[:need])
    return ScalePlan(workload.ident, workload.desired, len(holders), len(ranked), chosen)


def wanted_for_scale_out(
    workloads: Iterable[Workload], nodes: Sequence[Obj], pods: Sequence[Obj], node: str
) -> tuple[list[Wanted], list[ScalePlan]]:
    """What this node warms for the opted-in workloads, and every plan (for the log)."""
    out, plans = [], []
    for w in workloads:
        if not w.models:
            log.info(
                "pre-warm: %s names no model (no %s on its template)", w.ident, MODEL_ANNOTATION
            )
            continue
        plan = plan_scale_out(w, nodes, pods)
        plans.append(plan)
        if node in plan.nodes:
            why = f"{w.ident} wants {plan.desired}, {plan.holders} node(s) hold the model"
            out.append(Wanted("scale-out", why, tuple(w.models), w.include))
    return out, plans


# --- reading the cluster -------------------------------------------------------------------


@dataclass
class ClusterView:
    pods: list[Obj] = field(default_factory=list)
    nodes: list[Obj] = field(default_factory=list)
    deployments: list[Obj] = field(default_factory=list)
    statefulsets: list[Obj] = field(default_factory=list)
    leaderworkersets: list[Obj] = field(default_factory=list)
    hpas: list[Obj] = field(default_factory=list)


#: (attribute, API path): collections read every watch pass, across all namespaces.
COLLECTIONS: Final = (
    ("pods", "/api/v1/pods"),
    ("nodes", "/api/v1/nodes"),
    ("deployments", "/apis/apps/v1/deployments"),
    ("statefulsets", "/apis/apps/v1/statefulsets"),
    ("hpas", "/apis/autoscaling/v2/horizontalpodautoscalers"),
    ("leaderworkersets", "/apis/leaderworkerset.x-k8s.io/v1/leaderworkersets"),
)
#: Collections that may not exist in a cluster (a CRD not installed): read as empty.
OPTIONAL: Final = frozenset({"leaderworkersets"})


class ClusterReadError(RuntimeError):
    """A collection the watcher needs could not be listed."""


class ClusterReader:
    """Lists what the watcher needs as raw JSON (no typed models: nothing is dropped), with
    the blocking ``kubernetes`` client in a worker thread."""

    def __init__(self, api_client: Any, request_timeout: float = 15.0) -> None:
        self.api_client = api_client
        self.timeout = request_timeout

    def _list(self, path: str, query: list[tuple[str, str]]) -> list[Obj]:
        from kubernetes.client.exceptions import ApiException

        params = self.api_client.param_serialize(
            "GET",
            path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*params, _request_timeout=self.timeout)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        data = json.loads(response.data)
        items = data.get("items") if isinstance(data, dict) else None
        return [i for i in items or [] if isinstance(i, dict)]

    async def read(self) -> ClusterView:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        view = ClusterView()
        for attr, path in COLLECTIONS:
            # pods that ended hold no GPU and need no model
            query = [("fieldSelector", "status.phase!=Succeeded,status.phase!=Failed")]
            try:
                items = await asyncio.to_thread(self._list, path, query if attr == "pods" else [])
            except ApiException as exc:
                if attr in OPTIONAL and exc.status == 404:
                    continue
                raise ClusterReadError(f"list {path}: HTTP {exc.status} {exc.reason}") from exc
            except (OSError, ValueError, HTTPError) as exc:
                raise ClusterReadError(f"list {path}: {type(exc).__name__}: {exc}") from exc
            setattr(view, attr, items)
        return view


def decide(view: ClusterView, node: str) -> tuple[list[Wanted], list[ScalePlan]]:
    """Everything this node should warm now: its bound pods' models first, then scale-out."""
    wanted = wanted_for_pods(view.pods, node)
    workloads = collect_workloads(
        deployments=view.deployments,
        statefulsets=view.statefulsets,
        leaderworkersets=view.leaderworkersets,
        hpas=view.hpas,
        pods=view.pods,
    )
    scale, plans = wanted_for_scale_out(workloads, view.nodes, view.pods, node)
    return wanted + scale, plans


__all__ = [
    "PREWARM_ANNOTATION",
    "ClusterReadError",
    "ClusterReader",
    "ClusterView",
    "ScalePlan",
    "Wanted",
    "Workload",
    "bound_pods",
    "collect_workloads",
    "decide",
    "node_fit",
    "plan_scale_out",
    "pod_gpus",
    "pod_start",
    "status_models",
]
