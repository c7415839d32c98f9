"""The admission pipeline: gate, validate, detect, run the mutations, diff once.

Pure: no I/O, never changes its input. The mutations run in order on one deep copy of the
pod; the JSON patch is one ``jsonpatch.make_patch(original, mutated)`` at the end, so what
the API server applies is exactly the difference between the two documents.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Final

import jsonpatch

from webhook.annotations import (
    ANN_CONTAINERS,
    ANN_MODEL,
    ANN_MOUNT_PATH,
    AnnotationError,
    check_inject_label,
    parse_pod_options,
)
from webhook.config import Config
from webhook.mutations.affinity import add_affinity
from webhook.mutations.containers import inject_containers
from webhook.mutations.context import (
    Context,
    ModelRef,
    Mutation,
    Pod,
    app_containers,
)
from webhook.mutations.detect import (
    container_tokens,
    detect_container,
    detect_models,
    references,
)
from webhook.mutations.rewrite import rewrite_model_args
from webhook.mutations.status import read_status, write_status
from webhook.mutations.volumes import add_volumes, mount_app_containers, mount_conflict

MUTATIONS: Final[tuple[tuple[str, Mutation], ...]] = (
    ("volumes", add_volumes),
    ("containers", inject_containers),
    ("mounts", mount_app_containers),
    ("rewrite", rewrite_model_args),
    ("affinity", add_affinity),
    ("status", write_status),
)


@dataclass(frozen=True)
class AdmissionResult:
    allowed: bool
    patch: list[dict[str, Any]]
    warnings: list[str]
    message: str | None
    decision: str  # "injected" | "skipped" | "denied" | "unchanged"
    reason: str
    mutations: list[str]


def _skip(reason: str, warnings: list[str] | None = None) -> AdmissionResult:
    return AdmissionResult(True, [], warnings or [], None, "skipped", reason, [])


def _deny(exc: AnnotationError) -> AdmissionResult:
    return AdmissionResult(False, [], [], str(exc), "denied", f"invalid {exc.key}", [])


def _str_map(value: object) -> bool:
    return value is None or (
        isinstance(value, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    )


def _container_shape(c: object) -> str | None:
    if not isinstance(c, dict) or not isinstance(c.get("name"), str):
        return "a container is not an object with a name"
    for key in ("command", "args"):
        v = c.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return f"container {c['name']}: {key} is not a list of strings"
    for key in ("env", "volumeMounts"):
        v = c.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
            return f"container {c['name']}: {key} is not a list of objects"
    return None


def shape_problem(pod: object) -> str | None:
    """Why a pod cannot be processed (the API server validated real pods; this guards the
    offline CLI and fuzzed requests), or None."""
    if not isinstance(pod, dict):
        return "object is not a mapping"
    meta = pod.get("metadata", {})
    if meta is not None and not isinstance(meta, dict):
        return "metadata is not an object"
    meta = meta or {}
    if not _str_map(meta.get("labels")) or not _str_map(meta.get("annotations")):
        return "metadata labels/annotations are not string maps"
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return "pod has no spec"
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return "pod spec has no containers"
    for key in ("initContainers", "volumes"):
        v = spec.get(key)
        if v is not None and not isinstance(v, list):
            return f"spec.{key} is not a list"
    for c in [*containers, *(spec.get("initContainers") or [])]:
        problem = _container_shape(c)
        if problem:
            return problem
    names = [c["name"] for c in [*containers, *(spec.get("initContainers") or [])]]
    if len(set(names)) != len(names):
        return "duplicate container names (the API server rejects the pod)"
    for v in spec.get("volumes") or []:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            return "a volume is not an object with a name"
    aff = spec.get("affinity")
    if aff is not None and not isinstance(aff, dict):
        return "spec.affinity is not an object"
    return None


def _references_model(container: dict[str, Any], refs: tuple[ModelRef, ...]) -> bool:
    values = list(container_tokens(container))
    values += [t.split("=", 1)[1] for t in values if "=" in t]
    values += [
        str(e.get("value")) for e in container.get("env") or [] if isinstance(e.get("value"), str)
    ]
    for ref in refs:
        for r in ref.references:
            base = r.rstrip("/")
            if any(v == r or (base and v.startswith(base + "/")) for v in values):
                return True
    return False


def _select_targets(
    spec: dict[str, Any],
    requested: tuple[str, ...] | None,
    previous: tuple[str, ...] | None,
    refs: tuple[ModelRef, ...],
) -> tuple[str, ...]:
    apps = app_containers(spec)
    names = [str(c["name"]) for c in apps]
    if requested is not None:
        missing = [n for n in requested if n not in names]
        if missing:
            raise AnnotationError(
                ANN_CONTAINERS,
                ",".join(requested),
                "names of app containers of this pod: " + (", ".join(names) or "(none)"),
                f"no app container named {missing[0]!r}",
            )
        return requested
    if previous:
        return tuple(n for n in names if n in previous)
    referencing = tuple(str(c["name"]) for c in apps if _references_model(c, refs))
    return referencing or tuple(names)


def _annotation_raw_uris(annotations: dict[str, Any]) -> list[str]:
    raw = annotations.get(ANN_MODEL)
    if not isinstance(raw, str):
        return []
    out = []
    for entry in raw.split(","):
        head = entry.split("://", 1)[0]
        out.append(entry.split("=", 1)[1].strip() if "=" in head else entry.strip())
    return out


#: The only parts of a pod the mutations change (see ``_working_copy``).
_META_KEYS: Final = ("annotations", "labels")


def _working_copy(pod: Pod) -> Pod:
    """Deep copies of spec and metadata labels/annotations, the rest shared: a pod with huge
    ``managedFields`` costs no copy and no diff."""
    work = dict(pod)
    meta = pod.get("metadata")
    if isinstance(meta, dict):
        work["metadata"] = {k: copy.deepcopy(v) if k in _META_KEYS else v for k, v in meta.items()}
    work["spec"] = copy.deepcopy(pod["spec"])
    return work


def _mutable_view(pod: Pod) -> Pod:
    """The mutable parts at their real paths, so the patch of the views is the pod's patch."""
    view: Pod = {"spec": pod["spec"]}
    if "metadata" in pod:
        meta = pod["metadata"]
        view["metadata"] = (
            {k: meta[k] for k in _META_KEYS if k in meta} if isinstance(meta, dict) else meta
        )
    return view


def plan_pod(pod: Pod, *, namespace: str | None, config: Config) -> Context | AdmissionResult:
    """Gate, validate and detect: the Context the mutations run with, or the final result
    (skipped or denied) when there is nothing to mutate. Reads ``pod`` only."""
    problem = shape_problem(pod)
    if problem:
        return _skip(f"not processed: {problem}")
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    ns = namespace or meta.get("namespace") or None
    if ns in config.excluded_namespaces:
        return _skip(f"namespace {ns} is excluded")
    try:
        if check_inject_label(meta.get("labels")) == "false":
            return _skip("opted out by label modelcache.io/inject=false")
        options = parse_pod_options(annotations, config)
    except AnnotationError as exc:
        return _deny(exc)
    spec: dict[str, Any] = pod["spec"]
    status = read_status(annotations)
    warnings: list[str] = []
    detected = [d for c in app_containers(spec) for d in detect_container(c)]
    if options.models is not None:
        models = options.models
    elif status is not None and status.models:
        models = status.models
    else:
        found, _ = detect_models(spec)
        models = tuple(found)
        for d in detected:
            warnings.append(
                f"detected model {d.uri} in container {d.container} ({d.framework}); "
                f"set {ANN_MODEL} to override"
            )
    if not models:
        return _skip(f"no model: no {ANN_MODEL} annotation and none detected in the app containers")
    raw_values = [d.value for d in detected] + _annotation_raw_uris(annotations)
    refs = tuple(ModelRef(m, references(m, raw_values)) for m in models)
    try:
        targets = _select_targets(
            spec, options.containers, status.containers if status else None, refs
        )
    except AnnotationError as exc:
        return _deny(exc)
    ctx = Context(
        config,
        options,
        refs,
        (),
        previous_rewrites=status.rewrites if status else (),
        previous_added=status.added if status else (),
    )
    usable: list[str] = []
    for c in app_containers(spec):
        if c["name"] not in targets:
            continue
        conflict = mount_conflict(c, ctx)
        if conflict:
            warnings.append(
                f"container {c['name']}: {conflict}; not mounted there (set {ANN_MOUNT_PATH})"
            )
        else:
            usable.append(str(c["name"]))
    if not usable:
        return _skip("no app container can mount the models", warnings)
    ctx.targets = tuple(usable)
    ctx.notes.warnings.extend(warnings)
    return ctx


def mutate_pod(
    pod: dict[str, Any], *, namespace: str | None, config: Config
) -> tuple[dict[str, Any], AdmissionResult]:
    """Return the mutated pod and the result; ``pod`` is never changed.

    The mutated pod shares the parts no mutation touches (``managedFields``, ``status``, ...)
    with the input: treat both as read-only. When nothing is mutated it is ``pod`` itself.
    """
    plan = plan_pod(pod, namespace=namespace, config=config)
    if isinstance(plan, AdmissionResult):
        return pod, plan
    ctx = plan
    work = _working_copy(pod)
    applied: list[str] = []
    for name, mutation in MUTATIONS:
        if (name == "rewrite" and ctx.options.rewrite == "off") or (
            name == "affinity" and ctx.options.affinity == "off"
        ):
            continue
        work = mutation(work, ctx)
        applied.append(name)
    warnings = list(ctx.notes.warnings)
    patch: list[dict[str, Any]] = jsonpatch.make_patch(
        _mutable_view(pod), _mutable_view(work)
    ).patch
    if not patch:
        return work, AdmissionResult(True, [], warnings, None, "unchanged", "already injected", [])
    opts = ctx.options
    reason = (
        f"models {','.join(m.name for m in ctx.named_models)} into {','.join(ctx.targets)} "
        f"(warmup {opts.warmup}, sidecar {opts.sidecar})"
    )
    return work, AdmissionResult(True, patch, warnings, None, "injected", reason, applied)


def admit_pod(pod: dict[str, Any], *, namespace: str | None, config: Config) -> AdmissionResult:
    """The admission decision for one pod (the server's entry point)."""
    return mutate_pod(pod, namespace=namespace, config=config)[1]
