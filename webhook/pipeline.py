"""The admission pipeline: gate, validate, detect, run the mutations, diff once.

Pure: no I/O, never changes its input. The mutations run in order on one deep copy of the
pod; the JSON patch is one ``webhook.patch.make_patch(original, mutated)`` at the end, so what
the API server applies is exactly the difference between the two documents.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from typing import Any, Final

from webhook.annotations import (
    ANN_CONTAINERS,
    ANN_MODEL,
    ANN_MOUNT_PATH,
    ANN_SKIPPED,
    LABEL_INJECT,
    AnnotationError,
    check_inject_annotation,
    check_inject_label,
    parse_pod_options,
)
from webhook.config import Config
from webhook.frameworks import LLAMACPP, image_hub_default
from webhook.mutations.affinity import add_affinity
from webhook.mutations.containers import inject_containers, ours_problem, reserved_name_problem
from webhook.mutations.context import (
    RESERVED_PREFIX,
    Context,
    Delivery,
    ModelRef,
    Mutation,
    Pod,
    app_containers,
)
from webhook.mutations.credentials import plan_node_credentials
from webhook.mutations.detect import (
    CREDENTIAL_ENV,
    HUB_CACHE_ENV,
    ROLES,
    ContainerFacts,
    name_models,
    read_container,
    references,
    unresolved_var,
)
from webhook.mutations.rewrite import rewrite_model_args
from webhook.mutations.status import read_status, write_status
from webhook.mutations.volumes import add_volumes, mount_app_containers, mount_conflict
from webhook.patch import make_patch

MUTATIONS: Final[tuple[tuple[str, Mutation], ...]] = (
    ("volumes", add_volumes),
    ("containers", inject_containers),
    ("mounts", mount_app_containers),
    ("rewrite", rewrite_model_args),
    ("affinity", add_affinity),
    ("status", write_status),
)
LWS_NAME_LABEL: Final = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL: Final = "leaderworkerset.sigs.k8s.io/worker-index"
#: KubeRay labels the pods of a RayCluster ``head`` or ``worker``
RAY_NODE_TYPE_LABEL: Final = "ray.io/node-type"
SKIP_WARNING_PREFIX: Final = "not injected: "
#: llama.cpp's ``-hf repo`` without a tag loads this quant (its "latest" tag)
DEFAULT_GGUF_QUANT: Final = "Q4_K_M"


@dataclass(frozen=True)
class AdmissionResult:
    allowed: bool
    patch: list[dict[str, Any]]
    warnings: list[str]
    message: str | None
    decision: str  # "injected" | "skipped" | "denied" | "unchanged"
    reason: str
    mutations: list[str]
    #: a skip that is recorded on the pod (``modelcache.io/skipped``)
    annotate: bool = False


def _skip(
    reason: str, warnings: list[str] | None = None, *, annotate: bool = True
) -> AdmissionResult:
    """Leave the pod alone. An opted-in pod left alone says why: a warning, and (when
    ``annotate``) the ``modelcache.io/skipped`` annotation on the pod itself."""
    out = list(warnings or [])
    if annotate:
        out.insert(0, SKIP_WARNING_PREFIX + reason)
    return AdmissionResult(True, [], out, None, "skipped", reason, [], annotate)


def _deny(exc: AnnotationError) -> AdmissionResult:
    return AdmissionResult(False, [], [], str(exc), "denied", f"invalid {exc.key}", [])


def _deny_message(message: str, reason: str) -> AdmissionResult:
    return AdmissionResult(False, [], [], message, "denied", reason, [])


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


def _references_model(facts: ContainerFacts, refs: tuple[ModelRef, ...]) -> bool:
    values = list(facts.tokens)
    values += [t.split("=", 1)[1] for t in values if "=" in t]
    values += list(facts.env.values())
    values += [f.value for f in facts.found]
    for ref in refs:
        for r in ref.references:
            base = r.rstrip("/")
            if any(v == r or (base and v.startswith(base + "/")) for v in values):
                return True
    return False


def _select_targets(
    spec: dict[str, Any],
    facts: dict[str, ContainerFacts],
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
    referencing = tuple(
        str(c["name"]) for c in apps if _references_model(facts[str(c["name"])], refs)
    )
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


def _no_model_reason(
    facts: dict[str, ContainerFacts], labels: dict[str, Any], group: str | None = None
) -> str:
    """Why no model was found, as precisely as the containers allow."""
    for f in facts.values():
        if f.unresolved:
            var = unresolved_var(f.unresolved[0])
            return (
                f"container {f.name} names its model through ${var}, whose value is not set in "
                f"its env (envFrom and valueFrom values are not visible at admission); set "
                f"{ANN_MODEL}"
            )
    frameworks = {f.framework.name for f in facts.values() if f.framework}
    if "ollama" in frameworks:
        return "Ollama pulls models from its own registry, which modelcache does not serve"
    if "nim" in frameworks:
        return (
            f"NIM downloads its model profile itself; set {ANN_MODEL} to a source modelcache "
            "can fetch and NIM_MODEL_PATH to use it"
        )
    lws = labels.get(LWS_NAME_LABEL) if isinstance(labels, dict) else None
    if (
        group == "worker"
        or any(f.ray_worker for f in facts.values())
        or (lws and labels.get(LWS_WORKER_INDEX_LABEL) not in (None, "0"))
        or labels.get(RAY_NODE_TYPE_LABEL) == "worker"
    ):
        return (
            "a worker of a multi-node group loads the model its leader names; set "
            f"{ANN_MODEL} on the worker template (python -m webhook inject does it for "
            "LeaderWorkerSets) so every pod of the group gets the same model"
        )
    if "ray-serve" in frameworks:
        return f"Ray Serve names its model in the Serve config; set {ANN_MODEL}"
    return f"no model: no {ANN_MODEL} annotation and none detected in the app containers"


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _runs_as_root(spec: dict[str, Any], container: dict[str, Any]) -> bool:
    pod_sc = _dict(spec.get("securityContext"))
    sc = _dict(container.get("securityContext"))
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if uid is None:
        return non_root is not True
    return bool(uid == 0)


def hub_dir_of(
    facts: ContainerFacts, spec: dict[str, Any], container: dict[str, Any]
) -> tuple[str, bool] | str:
    """Where this container's Hugging Face client caches: (dir, set HF_HUB_CACHE), or the
    reason it cannot be told."""
    if facts.cache_dir_flag:
        if facts.cache_dir_flag.startswith("/"):
            return facts.cache_dir_flag.rstrip("/") or "/", False
        return f"its cache directory flag names a relative path {facts.cache_dir_flag!r}"
    default = image_hub_default(facts.image)
    names = (
        (*HUB_CACHE_ENV, "HF_HOME")
        if default
        else (*HUB_CACHE_ENV, "HF_HOME", "XDG_CACHE_HOME", "HOME")
    )
    for name in names:
        if name not in facts.env_names:
            continue
        value = facts.env.get(name)
        if value is None or "$" in value or not value.startswith("/"):
            return f"its {name} is not a plain absolute path in env"
        base = value.rstrip("/") or ""
        if name in HUB_CACHE_ENV:
            return base or "/", False
        if name == "HF_HOME":
            return f"{base}/hub", False
        if name == "XDG_CACHE_HOME":
            return f"{base}/huggingface/hub", False
        return f"{base}/.cache/huggingface/hub", False
    if default:
        # the image's own ENV (HF_HOME) decides, unless the pod sets a Hugging Face variable
        return default, True
    if _runs_as_root(spec, container):
        return "/root/.cache/huggingface/hub", True
    return "it runs as a non-root user and sets neither HOME nor HF_HOME in env"


def _read_only_mount_over(container: dict[str, Any], path: str) -> str | None:
    """The read-only volume mounted at or above ``path`` in this container, else None."""
    for m in container.get("volumeMounts") or []:
        if not isinstance(m, dict) or m.get("readOnly") is not True:
            continue
        mp = str(m.get("mountPath") or "").rstrip("/") or "/"
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            return str(m.get("name"))
    return None


def _qos_class(spec: dict[str, Any]) -> str:
    """The pod's QoS class as the API server computes it (cpu and memory only)."""
    containers = [
        c
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
        if isinstance(c, dict)
    ]
    any_set = False
    guaranteed = True
    for c in containers:
        res = _dict(c.get("resources"))
        req = _dict(res.get("requests"))
        lim = _dict(res.get("limits"))
        for r in ("cpu", "memory"):
            if r in req or r in lim:
                any_set = True
            if r not in lim or str(req.get(r, lim[r])) != str(lim[r]):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _credentials(
    spec: dict[str, Any], targets: tuple[str, ...]
) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """The app containers' own credentials (first wins), as env entries for our containers,
    and the app's ``envFrom`` Secrets.

    A credential the app takes through ``envFrom`` becomes an explicit optional
    ``secretKeyRef`` of the same Secret (the key is the variable's name less the prefix), so
    our containers get the same token and nothing else from that Secret: no endpoint, which
    would let a pod steer the fetch that fills the shared node cache."""
    env: list[dict[str, Any]] = []
    env_from: list[dict[str, Any]] = []
    seen: set[str] = set()
    wanted = set(targets)
    seen_from: set[str] = set()
    for c in app_containers(spec):
        if c["name"] not in wanted:
            continue
        for item in c.get("env") or []:
            name = item.get("name") if isinstance(item, dict) else None
            if name in CREDENTIAL_ENV and name not in seen:
                seen.add(str(name))
                env.append(copy.deepcopy(item))
        for src in c.get("envFrom") or []:
            ref = src.get("secretRef") if isinstance(src, dict) else None
            if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
                continue
            key = json.dumps(src, sort_keys=True)
            if key in seen_from:
                continue
            seen_from.add(key)
            env_from.append(copy.deepcopy(src))
            prefix = str(src.get("prefix") or "")
            for var in CREDENTIAL_ENV:
                if var in seen or not var.startswith(prefix):
                    continue
                env.append(
                    {
                        "name": var,
                        "valueFrom": {
                            "secretKeyRef": {
                                "name": ref["name"],
                                "key": var[len(prefix) :],
                                "optional": True,
                            }
                        },
                    }
                )
    return tuple(env), tuple(env_from)


def _quant_glob(quant: str) -> str:
    """A case-insensitive glob for GGUF files of a quant tag (llama.cpp matches it so)."""
    letters = "".join(f"[{ch.upper()}{ch.lower()}]" if ch.isalpha() else ch for ch in quant)
    return f"*{letters}*.gguf"


def plan_pod(
    pod: Pod, *, namespace: str | None, config: Config, group: str | None = None
) -> Context | AdmissionResult:
    """Gate, validate and detect: the Context the mutations run with, or the final result
    (skipped or denied) when there is nothing to mutate. Reads ``pod`` only."""
    problem = shape_problem(pod)
    if problem:
        return _skip(f"not processed: {problem}", annotate=False)
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    ns = namespace or meta.get("namespace") or None
    if ns in config.excluded_namespaces:
        return _skip(f"namespace {ns} is excluded", annotate=False)
    try:
        if check_inject_label(labels) == "false":
            return _skip(f"opted out by label {LABEL_INJECT}=false")
        if check_inject_annotation(annotations) == "false":
            return _skip(f"opted out by annotation {LABEL_INJECT}=false")
        options = parse_pod_options(annotations, config)
    except AnnotationError as exc:
        return _deny(exc)
    spec: dict[str, Any] = pod["spec"]
    status = read_status(annotations)
    reserved = reserved_name_problem(spec, annotations, status)
    if reserved:
        return _deny_message(reserved, "reserved name")
    if status is not None and status.node_cache != config.node_cache:
        # never rebuild (or keep) the other shape: a hostPath-era sidecar is privileged
        return _deny_message(
            f"this pod was injected with nodeCache {status.node_cache} and the webhook runs "
            f"with nodeCache {config.node_cache}; inject the original manifest again (without "
            f"the {RESERVED_PREFIX}* containers and volumes and the modelcache.io annotations "
            "it added)",
            "node cache mode changed",
        )
    facts = {str(c["name"]): read_container(c, labels) for c in app_containers(spec)}
    warnings: list[str] = []
    if options.models is not None:
        models = options.models
    elif status is not None and status.models:
        models = status.models
    else:
        uris: list[str] = []
        for role in ROLES:
            for f in facts.values():
                for found in f.found:
                    if found.role == role and found.uri not in uris:
                        uris.append(found.uri)
        models = tuple(name_models(uris))
        for f in facts.values():
            for found in f.found:
                warnings.append(
                    f"detected model {found.uri} in container {f.name} "
                    f"({f.framework_name}, {found.role}, {found.where}); set {ANN_MODEL} to "
                    "override"
                )
    if not models:
        return _skip(_no_model_reason(facts, labels, group))
    raw_values = [fd.value for f in facts.values() for fd in f.found] + _annotation_raw_uris(
        annotations
    )
    refs = tuple(ModelRef(m, references(m, raw_values)) for m in models)
    try:
        targets = _select_targets(
            spec, facts, options.containers, status.containers if status else None, refs
        )
    except AnnotationError as exc:
        return _deny(exc)
    if options.models is not None and status is None and group != "worker":
        for ref in refs:
            if not any(_references_model(facts[n], (ref,)) for n in targets if n in facts):
                warnings.append(
                    f"model {ref.model.name} ({ref.model.source.uri}) of {ANN_MODEL} is not "
                    "referenced by any app container; it is cached and mounted, but check that "
                    "the app loads this model"
                )
    containers = {str(c["name"]): c for c in app_containers(spec)}
    deliveries: list[Delivery] = []
    usable: list[str] = []
    ctx_probe = Context(config, options, refs, ())
    for name in targets:
        c, fc = containers.get(name), facts.get(name)
        if c is None or fc is None:
            continue
        f = fc
        conflict = mount_conflict(c, ctx_probe)
        hub_client = f.framework is None or f.framework.hub_client
        mine: list[Delivery] = []
        why: str | None = None
        for m in models:
            if m.source.is_hub and hub_client and options.rewrite != "path":
                where = hub_dir_of(f, spec, c)
                if isinstance(where, str):
                    why = f"cannot tell where its Hugging Face client caches: {where}"
                    break
                hub_dir, set_env = where
                ro = _read_only_mount_over(c, hub_dir)
                if ro:
                    why = (
                        f"its Hugging Face cache {hub_dir} is on the read-only volume {ro!r}, "
                        "where the model's folder cannot be mounted"
                    )
                    break
                if (
                    f.has_env_from
                    and not set_env
                    and not (set(HUB_CACHE_ENV) | {"HF_HOME"}) & f.env_names
                ):
                    set_env = True
                if set_env and f.has_env_from:
                    warnings.append(
                        f"container {name}: envFrom may set the Hugging Face cache; "
                        f"HF_HUB_CACHE is set to {hub_dir} so the cached model is found"
                    )
                mine.append(Delivery(name, m.name, "hub-cache", hub_dir, set_env))
            else:
                if conflict:
                    why = f"{conflict} (set {ANN_MOUNT_PATH})"
                    break
                mine.append(Delivery(name, m.name, "path"))
        if why:
            warnings.append(f"container {name}: {why}; not injected there")
            continue
        usable.append(name)
        deliveries.extend(mine)
    if not usable:
        reason = next(
            (w.split(": ", 1)[1] for w in warnings if w.startswith("container ")),
            "no app container can use the models",
        )
        return _skip(f"no app container can use the models: {reason}", warnings)
    if options.models is None and status is None:
        for d in deliveries:
            if d.mode == "path" and facts[d.container].multi_node:
                return _skip(
                    f"container {d.container} is part of a multi-node group and its model "
                    f"would be rewritten to a path the other pods of the group do not have; "
                    f"set {ANN_MODEL} on every pod template of the group",
                    warnings,
                )
    usable_set = set(usable)
    node_secret: str | None = None
    credential_keys: tuple[tuple[str, str], ...] = ()
    if config.node_cache == "csi":
        pvc = next((m for m in models if m.source.scheme == "pvc"), None)
        if pvc is not None:
            return _skip(
                f"model {pvc.name} ({pvc.source.uri}): pvc:// sources are not served through "
                "the CSI driver yet (the cluster setting nodeCache: hostPath serves them)",
                warnings,
            )
        creds = plan_node_credentials(
            [containers[n] for n in usable], models, config.fallback_credentials_secret
        )
        if isinstance(creds, str):
            return _skip(creds, warnings)
        node_secret, credential_keys = creds.secret, creds.keys
        app_env: tuple[dict[str, Any], ...] = ()
        app_env_from: tuple[dict[str, Any], ...] = ()
    else:
        app_env, app_env_from = _credentials(spec, tuple(usable))
    aliases: list[tuple[str, str]] = []
    include = list(options.include)
    by_uri = {m.source.uri: m for m in models}
    for f in facts.values():
        if f.name not in usable_set:
            continue
        for found in f.found:
            bm = by_uri.get(found.uri)
            if bm is None or found.role != "base" or f.framework is not LLAMACPP:
                continue
            if found.where != "--hf-repo":
                continue
            if found.hf_file and not options.include:
                include.append(found.hf_file)
            elif not found.hf_file:
                quant = found.quant or DEFAULT_GGUF_QUANT
                aliases.append((bm.name, quant))
                if not options.include:
                    include.append(_quant_glob(quant))
    if status is not None:
        # the first admission's choices: the rewritten args no longer show them
        aliases = list(status.aliases)
        include = list(options.include) or list(status.include)
    if include and not options.include:
        options = replace(options, include=tuple(dict.fromkeys(include)))
    ctx = Context(
        config,
        options,
        refs,
        tuple(usable),
        previous_rewrites=status.rewrites if status else (),
        previous_added=status.added if status else (),
        previous_warnings=status.warnings if status else None,
        deliveries=tuple(deliveries),
        app_credentials=app_env,
        app_env_from=app_env_from,
        qos=_qos_class(spec),
        gguf_aliases=tuple(aliases),
        facts=facts,
        node_secret=node_secret,
        credential_keys=credential_keys,
    )
    if status is not None:
        problem = ours_problem(spec, ctx)
        if problem:
            return _deny_message(problem, "reserved name")
    ctx.notes.warnings.extend(warnings)
    return ctx


def _annotate_skip(pod: Pod, result: AdmissionResult) -> tuple[Pod, AdmissionResult]:
    """The skipped pod with ``modelcache.io/skipped: <reason>`` (no patch when it has it)."""
    meta = pod.get("metadata")
    current = meta.get("annotations") if isinstance(meta, dict) else None
    if isinstance(current, dict) and current.get(ANN_SKIPPED) == result.reason:
        return pod, result
    work = _working_copy(pod)
    if not isinstance(work.get("metadata"), dict):
        work["metadata"] = {}
    if not isinstance(work["metadata"].get("annotations"), dict):
        work["metadata"]["annotations"] = {}
    work["metadata"]["annotations"][ANN_SKIPPED] = result.reason
    patch = make_patch(_mutable_view(pod), _mutable_view(work))
    return work, replace(result, patch=patch)


def skip_pod(pod: Pod, reason: str) -> tuple[Pod, AdmissionResult]:
    """Leave an opted-in pod alone for a reason found outside the pod (``inject``)."""
    return _annotate_skip(pod, _skip(reason))


def mutate_pod(
    pod: dict[str, Any], *, namespace: str | None, config: Config, group: str | None = None
) -> tuple[dict[str, Any], AdmissionResult]:
    """Return the mutated pod and the result; ``pod`` is never changed.

    The mutated pod shares the parts no mutation touches (``managedFields``, ``status``, ...)
    with the input: treat both as read-only. When nothing is mutated it is ``pod`` itself.
    """
    plan = plan_pod(pod, namespace=namespace, config=config, group=group)
    if isinstance(plan, AdmissionResult):
        if plan.decision == "skipped" and plan.annotate:
            return _annotate_skip(pod, plan)
        return pod, plan
    ctx = plan
    work = _working_copy(pod)
    applied: list[str] = []
    for name, mutation in MUTATIONS:
        if name == "affinity" and ctx.options.affinity == "off":
            continue
        work = mutation(work, ctx)
        applied.append(name)
    annotations = work["metadata"].get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(ANN_SKIPPED, None)
    warnings = list(ctx.notes.warnings)
    patch = make_patch(_mutable_view(pod), _mutable_view(work))
    if not patch:
        return work, AdmissionResult(True, [], warnings, None, "unchanged", "already injected", [])
    opts = ctx.options
    modes = sorted({d.mode for d in ctx.deliveries})
    reason = (
        f"models {','.join(m.name for m in ctx.named_models)} into {','.join(ctx.targets)} "
        f"({'+'.join(modes)}, warmup {opts.warmup}, sidecar {opts.sidecar})"
    )
    return work, AdmissionResult(True, patch, warnings, None, "injected", reason, applied)


def admit_pod(pod: dict[str, Any], *, namespace: str | None, config: Config) -> AdmissionResult:
    """The admission decision for one pod (the server's entry point)."""
    return mutate_pod(pod, namespace=namespace, config=config)[1]
