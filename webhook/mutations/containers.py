"""Our containers: the warm-up init container and the cache-client sidecar.

Builders are pure (context in, container dict out). Commands are exec arrays, never a shell:
annotation values reach ``python -m sidecar`` as separate argv entries.

The ``modelcache-`` prefix is reserved: a pod that arrives with a container or volume of that
name that modelcache did not produce (no status, or fields that differ from what the status
rebuilds) is denied (``reserved_name_problem``, ``ours_problem``): a user container named
``modelcache-sidecar`` must never receive what the webhook gives its own containers.
Re-admitting an injected pod rebuilds the same containers, which is what makes it a no-op.

Injected containers never change the pod's QoS class (``shape_resources``) and report
failures through ``FallbackToLogsOnError``, so ``kubectl describe`` shows why they failed.

``nodeCache: csi``: both containers meet PodSecurity ``restricted`` (non-root uid 65532, no
privilege escalation, every capability dropped, seccomp ``RuntimeDefault``, read-only root
file system) and carry no credentials: the node side fetches, with the pod's Secret handed
to it by the kubelet. The warm-up only reports the node side's progress through the socket
in ``modelcache-fuse-socket``; the sidecar serves the FUSE mount the node side set up.
``nodeCache: hostPath`` (legacy): a root warm-up fills the hostPath cache with the app's
credentials and a privileged sidecar mounts FUSE with Bidirectional propagation.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Final

from sidecar.layout import APP_CACHE_ROOT, CONTAINER_CACHE_DIR
from webhook.annotations import ANN_STATUS
from webhook.config import Resources
from webhook.mutations.context import (
    CACHE_VOLUME,
    FUSE_SOCKET_VOLUME,
    FUSE_VOLUME,
    HUB_VIEW_PATH,
    HUB_VOLUME,
    MESH_INIT_CONTAINERS,
    MNT_VOLUME,
    MODELS_VOLUME,
    NODE_SOCKET,
    NODE_SOCKET_DIR,
    PVC_ROOT,
    RESERVED_PREFIX,
    SIDECAR_HUB_DIR,
    SIDECAR_MOUNTPOINT,
    SIDECAR_NAME,
    WARMUP_NAME,
    Container,
    Context,
    Pod,
    containers_of,
)
from webhook.mutations.volumes import (
    app_mounts,
    file_root_mounts,
    file_roots_used,
    pod_volumes,
    pvc_claims,
    pvc_mounts,
)

#: The startupProbe runs only until the mount serves, and the kubelet starts the app at the
#: first success: a 1 s period costs a python start per second during start-up and saves up
#: to a second on every pod start (measured: ~30% of a warm-node start with 2 s).
PROBE_PERIOD: Final = 1
#: block/off mode: the mount serves from a complete cache (or lists the source) quickly
PROBE_WINDOW: Final = 300
PRIVILEGED_WARNING: Final = (
    f"{SIDECAR_NAME} runs privileged (Bidirectional mount propagation of its FUSE mount needs it)"
)


#: uid and gid of our containers in csi mode (the distroless ``nonroot`` user)
NONROOT_UID: Final = 65532
RESTRICTED_SECURITY_CONTEXT: Final = {
    "runAsNonRoot": True,
    "runAsUser": NONROOT_UID,
    "runAsGroup": NONROOT_UID,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
    "readOnlyRootFilesystem": True,
}


def _model_flags(ctx: Context) -> list[str]:
    out: list[str] = []
    for m in ctx.named_models:
        out += ["--model", m.to_arg()]
    return out


def _source_flags(ctx: Context) -> list[str]:
    out: list[str] = []
    for root in file_roots_used(ctx):
        out += ["--file-root", root]
    if ctx.config.serve_cached_when_unreachable:
        out.append("--serve-cached-when-unreachable")
    if ctx.options.include:
        out += ["--include", ",".join(ctx.options.include)]
    if pvc_claims(ctx):
        out += ["--pvc-root", PVC_ROOT]
    return out


def credential_env(ctx: Context) -> list[dict[str, Any]]:
    """The credentials the app containers use (their own env entries, same value or
    ``valueFrom``, and their ``envFrom`` Secrets' credential keys), then the cluster's
    per-scheme Secrets for the variables they do not set. Endpoints (``HF_ENDPOINT``,
    ``AWS_ENDPOINT_URL``, ...) come only from the cluster's Secrets: the fetch fills a cache
    shared by every namespace, so a pod never chooses where it fetches from."""
    env: list[dict[str, Any]] = [copy.deepcopy(e) for e in ctx.app_credentials]
    seen: set[str] = {str(e.get("name")) for e in env}
    for m in ctx.named_models:
        creds = ctx.config.credentials.for_scheme(m.source.scheme)
        if creds is None or creds.secret_name is None:
            continue
        for key, var in creds.keys.items():
            if var in seen:
                continue
            seen.add(var)
            env.append(
                {
                    "name": var,
                    "valueFrom": {
                        "secretKeyRef": {"name": creds.secret_name, "key": key, "optional": True}
                    },
                }
            )
    return env


def _cache_mount() -> dict[str, Any]:
    return {"name": CACHE_VOLUME, "mountPath": CONTAINER_CACHE_DIR}


def shape_resources(resources: Resources, qos: str) -> dict[str, Any]:
    """Our containers' resources for a pod of this QoS class, so the class never changes:
    none for BestEffort; requests equal to limits (cpu and memory, the larger value) for
    Guaranteed; the configured ones otherwise."""
    if qos == "BestEffort":
        return {}
    out = resources.to_k8s()
    if qos != "Guaranteed":
        return out
    req, lim = dict(out.get("requests", {})), dict(out.get("limits", {}))
    both: dict[str, str] = {}
    for r in ("cpu", "memory"):
        value = lim.get(r) or req.get(r)
        if value is not None:
            both[r] = value
    for r, v in lim.items():
        if r not in ("cpu", "memory"):
            both.setdefault(r, v)
    both.setdefault("cpu", "100m")
    both.setdefault("memory", "256Mi")
    return {"limits": dict(both), "requests": dict(both)}


def _our_container(ctx: Context, name: str, command: list[str], resources: Resources) -> Container:
    """The fields our two containers share: the sidecar image, credentials, resources."""
    container: Container = {
        "name": name,
        "image": ctx.config.sidecar_image,
        "imagePullPolicy": ctx.config.image_pull_policy,
        "command": command,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if ctx.csi:
        # the node side holds the cache and the credentials: nothing to pass
        container["securityContext"] = copy.deepcopy(RESTRICTED_SECURITY_CONTEXT)
    else:
        # pins in the node cache name this pod (its uid), so they survive sidecar restarts
        container["env"] = [
            {"name": "MODELCACHE_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            *credential_env(ctx),
        ]
    shaped = shape_resources(resources, ctx.qos)
    if shaped:
        container["resources"] = shaped
    return container


def _socket_mount() -> dict[str, Any]:
    return {"name": FUSE_SOCKET_VOLUME, "mountPath": NODE_SOCKET_DIR}


def build_warmup_container(ctx: Context) -> Container:
    if ctx.csi:
        command = [
            "python",
            "-m",
            "sidecar",
            "warmup",
            "--node-socket",
            NODE_SOCKET,
            *_model_flags(ctx),
            "--timeout",
            str(ctx.options.warmup_timeout),
            "--on-failure",
            ctx.on_failure,
        ]
        container = _our_container(ctx, WARMUP_NAME, command, ctx.config.warmup_resources)
        container["volumeMounts"] = [_socket_mount()]
        return container
    command = [
        "python",
        "-m",
        "sidecar",
        "warmup",
        "--cache-dir",
        CONTAINER_CACHE_DIR,
        *_model_flags(ctx),
        "--timeout",
        str(ctx.options.warmup_timeout),
        "--on-failure",
        ctx.on_failure,
        *_source_flags(ctx),
    ]
    container = _our_container(ctx, WARMUP_NAME, command, ctx.config.warmup_resources)
    # root (owner of the hostPath cache) but no capabilities and no escalation: it only
    # writes files into the cache directory
    container["securityContext"] = {
        "runAsUser": 0,
        "runAsNonRoot": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    container["volumeMounts"] = [_cache_mount(), *pvc_mounts(ctx), *file_root_mounts(ctx)]
    return container


def probe_command(ctx: Context, wait: int | None = None) -> list[str]:
    cmd = ["python", "-m", "sidecar", "probe", "--mountpoint", SIDECAR_MOUNTPOINT]
    for m in ctx.named_models:
        cmd += ["--model", m.name]
    if wait is not None:
        cmd += ["--wait", str(wait)]
    return cmd


def startup_window(ctx: Context) -> int:
    """Seconds the mount may take to serve: the warm-up timeout in async mode (the sidecar
    lists the source and starts filling), a fixed window otherwise."""
    if ctx.options.warmup == "async":
        return ctx.options.warmup_timeout
    return PROBE_WINDOW


def _mount_command(ctx: Context, origin: list[str]) -> list[str]:
    """``python -m sidecar mount`` up to its GGUF aliases; ``origin`` says where file lists
    and completion come from (``--node-socket`` or ``--cache-dir``)."""
    command = [
        "python",
        "-m",
        "sidecar",
        "mount",
        *origin,
        "--mountpoint",
        SIDECAR_MOUNTPOINT,
        "--link-root",
        APP_CACHE_ROOT,
        *_model_flags(ctx),
    ]
    if ctx.hub_models:
        command += ["--hub-cache", SIDECAR_HUB_DIR, "--hub-link-root", HUB_VIEW_PATH]
    for name, quant in ctx.gguf_aliases:
        command += ["--gguf-alias", f"{name}:{quant}"]
    return command


def _csi_sidecar_command(ctx: Context) -> list[str]:
    command = _mount_command(ctx, ["--node-socket", NODE_SOCKET])
    if ctx.options.include:
        command += ["--include", ",".join(ctx.options.include)]
    return [*command, "--on-failure", ctx.on_failure]


def _csi_sidecar_mounts(ctx: Context) -> list[dict[str, Any]]:
    mounts = [
        {"name": FUSE_VOLUME, "mountPath": SIDECAR_MOUNTPOINT, "readOnly": True},
        _socket_mount(),
        {"name": MODELS_VOLUME, "mountPath": APP_CACHE_ROOT, "readOnly": True},
    ]
    if ctx.hub_models:
        mounts.append({"name": HUB_VOLUME, "mountPath": SIDECAR_HUB_DIR})
    return mounts


def build_sidecar_container(ctx: Context) -> Container:
    if ctx.csi:
        container = _our_container(
            ctx, SIDECAR_NAME, _csi_sidecar_command(ctx), ctx.config.sidecar_resources
        )
        container["volumeMounts"] = _csi_sidecar_mounts(ctx)
        return _with_startup(container, ctx)
    command = _mount_command(ctx, ["--cache-dir", CONTAINER_CACHE_DIR])
    command += ["--on-failure", ctx.on_failure]
    if ctx.options.warmup == "async":
        command += ["--warmup", "--timeout", str(ctx.options.warmup_timeout)]
    command += _source_flags(ctx)
    container = _our_container(ctx, SIDECAR_NAME, command, ctx.config.sidecar_resources)
    container["securityContext"] = {"privileged": True, "runAsUser": 0, "runAsNonRoot": False}
    container["volumeMounts"] = [
        _cache_mount(),
        {"name": MNT_VOLUME, "mountPath": SIDECAR_MOUNTPOINT, "mountPropagation": "Bidirectional"},
        *pvc_mounts(ctx),
        *file_root_mounts(ctx),
    ]
    if ctx.hub_models:
        container["volumeMounts"].append({"name": HUB_VOLUME, "mountPath": SIDECAR_HUB_DIR})
    return _with_startup(container, ctx)


def _with_startup(container: Container, ctx: Context) -> Container:
    """The native sidecar's startupProbe, or the classic one's blocking postStart."""
    window = startup_window(ctx)
    if ctx.options.sidecar == "native":
        container["restartPolicy"] = "Always"
        container["startupProbe"] = {
            "exec": {"command": probe_command(ctx)},
            "periodSeconds": PROBE_PERIOD,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(window / PROBE_PERIOD) + 1,
        }
    else:
        # the kubelet starts the next container only when postStart returns: the app
        # containers start once the mount serves
        container["lifecycle"] = {"postStart": {"exec": {"command": probe_command(ctx, window)}}}
    return container


#: Fields of our containers that decide what they run and with which rights: on
#: re-admission they must be exactly what the status rebuilds (other webhooks may add
#: resources or unrelated env, never change these).
_COMPARED: Final = (
    "image",
    "command",
    "args",
    "securityContext",
    "restartPolicy",
    "volumeMounts",
    "envFrom",
    "lifecycle",
    "startupProbe",
)
#: env a container-wide webhook must not add to ours: it decides where we fetch from.
_SENSITIVE_ENV_SUFFIXES: Final = ("_ENDPOINT", "_PROXY", "_TOKEN", "_KEY", "_KEY_ID")


def reserved_name_problem(
    spec: dict[str, Any], annotations: dict[str, Any], status: object | None
) -> str | None:
    """A ``modelcache-*`` container or volume, or a status, on a pod modelcache never
    injected: the denial message, else None."""
    if not isinstance(annotations, dict):
        annotations = {}
    if ANN_STATUS in annotations and status is None:
        return f"annotation {ANN_STATUS} was not written by modelcache (unreadable); remove it"
    if status is not None:
        return None
    for kind in ("initContainers", "containers", "volumes"):
        for item in spec.get(kind) or []:
            name = item.get("name") if isinstance(item, dict) else None
            if isinstance(name, str) and name.startswith(RESERVED_PREFIX):
                what = "volume" if kind == "volumes" else "container"
                return (
                    f"{what} {name!r}: the {RESERVED_PREFIX} prefix is reserved for what "
                    "modelcache injects; rename it"
                )
            mount = _reserved_mount(item) if kind != "volumes" else None
            if mount:
                return (
                    f"container {name!r} mounts volume {mount!r}: the {RESERVED_PREFIX} prefix "
                    "is reserved for what modelcache injects"
                )
    return None


def _reserved_mount(container: object) -> str | None:
    """The first ``modelcache-*`` volume a container mounts, else None."""
    if not isinstance(container, dict):
        return None
    for m in container.get("volumeMounts") or []:
        vol = m.get("name") if isinstance(m, dict) else None
        if isinstance(vol, str) and vol.startswith(RESERVED_PREFIX):
            return vol
    return None


def _env_differs(existing: Container, built: Container) -> str | None:
    theirs = {e.get("name"): e for e in existing.get("env") or [] if isinstance(e, dict)}
    ours = {e["name"]: e for e in built.get("env") or []}
    for name, entry in ours.items():
        if theirs.get(name) != entry:
            return f"env {name}"
    for name in theirs:
        if name not in ours and str(name).endswith(_SENSITIVE_ENV_SUFFIXES):
            return f"env {name}"
    return None


def ours_problem(spec: dict[str, Any], ctx: Context) -> str | None:
    """On re-admission: our containers and volumes must be what the status rebuilds."""
    built = {c["name"]: c for c in build_ours(ctx)}
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind) or []:
            name = c.get("name") if isinstance(c, dict) else None
            if not isinstance(name, str) or not name.startswith(RESERVED_PREFIX):
                continue
            mine = built.get(name)
            if mine is None:
                return f"container {name!r} was not injected by modelcache; rename it"
            for key in _COMPARED:
                if key == "restartPolicy" and kind == "containers":
                    continue
                if c.get(key) != mine.get(key):
                    return (
                        f"container {name!r} differs from what modelcache injects ({key}); "
                        f"the {RESERVED_PREFIX} prefix is reserved"
                    )
            differs = _env_differs(c, mine)
            if differs:
                return (
                    f"container {name!r} differs from what modelcache injects ({differs}); "
                    f"the {RESERVED_PREFIX} prefix is reserved"
                )
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind) or []:
            name = c.get("name") if isinstance(c, dict) else None
            if not isinstance(name, str) or name.startswith(RESERVED_PREFIX):
                continue
            allowed = (
                app_mounts(ctx, name) if kind == "containers" and name in ctx.target_set else []
            )
            for m in c.get("volumeMounts") or []:
                vol = m.get("name") if isinstance(m, dict) else None
                if isinstance(vol, str) and vol.startswith(RESERVED_PREFIX) and m not in allowed:
                    return (
                        f"container {name!r} mounts volume {vol!r} at {m.get('mountPath')!r}, "
                        f"which modelcache did not give it; the {RESERVED_PREFIX} prefix is "
                        "reserved"
                    )
    vols = {v["name"]: v for v in pod_volumes(ctx)}
    for v in spec.get("volumes") or []:
        name = v.get("name") if isinstance(v, dict) else None
        if isinstance(name, str) and name.startswith(RESERVED_PREFIX) and vols.get(name) != v:
            return (
                f"volume {name!r} differs from what modelcache injects; the {RESERVED_PREFIX} "
                "prefix is reserved"
            )
    return None


def build_ours(ctx: Context) -> list[Container]:
    out = [build_sidecar_container(ctx)]
    if ctx.options.warmup == "block":
        out.append(build_warmup_container(ctx))
    if ctx.options.sidecar != "native":
        out[0].pop("restartPolicy", None)
    return out


def _take(spec: dict[str, Any], name: str) -> Container | None:
    """Remove and return the container called name from init or regular containers."""
    for kind in ("initContainers", "containers"):
        items = spec.get(kind)
        if not isinstance(items, list):
            continue
        for i, c in enumerate(items):
            if isinstance(c, dict) and c.get("name") == name:
                return items.pop(i)  # type: ignore[no-any-return]
    return None


def _init_insert_index(inits: list[Any]) -> int:
    """After the last mesh init container (or native mesh sidecar), else first."""
    idx = 0
    for i, c in enumerate(inits):
        if isinstance(c, dict) and c.get("name") in MESH_INIT_CONTAINERS:
            idx = i + 1
    return idx


def _mesh_without_native_proxy(spec: dict[str, Any]) -> str | None:
    """The mesh init container (istio-init, linkerd-init) whose proxy is not a native sidecar."""
    inits = [c for c in spec.get("initContainers") or [] if isinstance(c, dict)]
    native = {c.get("name") for c in inits if c.get("restartPolicy") == "Always"}
    for init, proxy in (("istio-init", "istio-proxy"), ("linkerd-init", "linkerd-proxy")):
        if any(c.get("name") == init for c in inits) and proxy not in native:
            return init
    return None


def inject_containers(pod: Pod, ctx: Context) -> Pod:
    """Place the warm-up (block mode) and the sidecar (native: init, classic: first regular).

    Order of init containers: mesh init containers already present, ``modelcache-warmup``,
    ``modelcache-sidecar`` (native), then the user's others in their order. On re-admission
    the containers already there (checked by ``ours_problem``) are kept as they are, so what
    other webhooks added to them stays.
    """
    spec = pod["spec"]
    warmup_had = _take(spec, WARMUP_NAME)
    sidecar_had = _take(spec, SIDECAR_NAME)
    ours: list[Container] = []
    if ctx.options.warmup == "block":
        ours.append(warmup_had or build_warmup_container(ctx))
    sidecar = sidecar_had or build_sidecar_container(ctx)
    if ctx.options.sidecar == "native":
        ours.append(sidecar)
    else:
        # a regular container must not carry restartPolicy
        sidecar.pop("restartPolicy", None)
        containers_of(spec, "containers").insert(0, sidecar)
    if ours:
        inits = containers_of(spec, "initContainers")
        at = _init_insert_index(inits)
        inits[at:at] = ours
    if not ctx.csi:
        ctx.notes.warn(PRIVILEGED_WARNING)
    # csi: our containers talk only to the node side's socket, never to the network
    mesh = None if ctx.csi else _mesh_without_native_proxy(spec)
    if mesh:
        ctx.notes.warn(
            f"{mesh} redirects traffic to a proxy that starts after {WARMUP_NAME} and "
            f"{SIDECAR_NAME}: they cannot reach the model source; use native mesh sidecars"
        )
    if spec.get("hostNetwork") is True and not ctx.csi:
        ctx.notes.warn(
            f"hostNetwork pod: {WARMUP_NAME} and {SIDECAR_NAME} fetch from the node's network "
            "namespace"
        )
    if ctx.options.sidecar == "classic" and spec.get("restartPolicy") in ("Never", "OnFailure"):
        ctx.notes.warn(
            f"classic {SIDECAR_NAME} never exits, so a pod with restartPolicy "
            f"{spec['restartPolicy']} never completes; use modelcache.io/sidecar: native"
        )
    return pod
