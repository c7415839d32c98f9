"""Our containers: the warm-up init container and the cache-client sidecar.

Builders are pure (context in, container dict out). Commands are exec arrays, never a shell:
annotation values reach ``python -m sidecar`` as separate argv entries.

A container the user already declared under our name (``modelcache-sidecar`` or
``modelcache-warmup``) is an override: its fields are kept and only missing ones are filled
in. Re-admitting an injected pod takes the same path, which is what makes it a no-op.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Final

from sidecar.layout import APP_CACHE_ROOT, CONTAINER_CACHE_DIR
from webhook.config import Resources
from webhook.mutations.context import (
    CACHE_VOLUME,
    MESH_INIT_CONTAINERS,
    MNT_VOLUME,
    PVC_ROOT,
    SIDECAR_MOUNTPOINT,
    SIDECAR_NAME,
    WARMUP_NAME,
    Container,
    Context,
    Pod,
    containers_of,
)
from webhook.mutations.volumes import pvc_claims, pvc_mounts

#: The startupProbe runs only until the mount serves, and the kubelet starts the app at the
#: first success: a 1 s period costs a python start per second during start-up and saves up
#: to a second on every pod start (measured: ~30% of a warm-node start with 2 s).
PROBE_PERIOD: Final = 1
#: block/off mode: the mount serves from a complete cache (or lists the source) quickly
PROBE_WINDOW: Final = 300
PRIVILEGED_WARNING: Final = (
    f"{SIDECAR_NAME} runs privileged (Bidirectional mount propagation of its FUSE mount needs it)"
)


def _model_flags(ctx: Context) -> list[str]:
    out: list[str] = []
    for m in ctx.named_models:
        out += ["--model", m.to_arg()]
    return out


def _source_flags(ctx: Context) -> list[str]:
    out: list[str] = []
    if ctx.options.include:
        out += ["--include", ",".join(ctx.options.include)]
    if pvc_claims(ctx):
        out += ["--pvc-root", PVC_ROOT]
    return out


def credential_env(ctx: Context) -> list[dict[str, Any]]:
    """Env from the per-scheme Secrets of the config, for the schemes the models use only."""
    env: list[dict[str, Any]] = []
    seen: set[str] = set()
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


def _our_container(ctx: Context, name: str, command: list[str], resources: Resources) -> Container:
    """The fields our two containers share: the sidecar image, credentials, resources."""
    container: Container = {
        "name": name,
        "image": ctx.config.sidecar_image,
        "imagePullPolicy": ctx.config.image_pull_policy,
        "command": command,
    }
    env = credential_env(ctx)
    if env:
        container["env"] = env
    limits = resources.to_k8s()
    if limits:
        container["resources"] = limits
    return container


def build_warmup_container(ctx: Context) -> Container:
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
    container["volumeMounts"] = [_cache_mount(), *pvc_mounts(ctx)]
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


def build_sidecar_container(ctx: Context) -> Container:
    command = [
        "python",
        "-m",
        "sidecar",
        "mount",
        "--cache-dir",
        CONTAINER_CACHE_DIR,
        "--mountpoint",
        SIDECAR_MOUNTPOINT,
        "--link-root",
        APP_CACHE_ROOT,
        *_model_flags(ctx),
    ]
    if ctx.options.warmup == "async":
        command += ["--warmup", "--timeout", str(ctx.options.warmup_timeout)]
    command += _source_flags(ctx)
    container = _our_container(ctx, SIDECAR_NAME, command, ctx.config.sidecar_resources)
    container["securityContext"] = {"privileged": True, "runAsUser": 0, "runAsNonRoot": False}
    container["volumeMounts"] = [
        _cache_mount(),
        {"name": MNT_VOLUME, "mountPath": SIDECAR_MOUNTPOINT, "mountPropagation": "Bidirectional"},
        *pvc_mounts(ctx),
    ]
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


def _merge_named(user: list[Any], ours: list[dict[str, Any]], key: str) -> None:
    present = {item.get(key) for item in user if isinstance(item, dict)}
    for item in ours:
        if item[key] not in present:
            user.append(item)


def fill_container(user: Container, built: Container) -> Container:
    """The user's container with our missing fields added; theirs always win."""
    out = copy.deepcopy(user)
    for key, value in built.items():
        if key not in out:
            out[key] = value
        elif key == "env" and isinstance(out[key], list):
            _merge_named(out[key], value, "name")
        elif key == "volumeMounts" and isinstance(out[key], list):
            _merge_named(out[key], value, "mountPath")
        elif key == "securityContext" and isinstance(out[key], dict):
            for k, v in value.items():
                out[key].setdefault(k, v)
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
    ``modelcache-sidecar`` (native), then the user's others in their order. A user-declared
    ``modelcache-warmup`` stays even outside block mode: it is an explicit request.
    """
    spec = pod["spec"]
    warmup_user = _take(spec, WARMUP_NAME)
    sidecar_user = _take(spec, SIDECAR_NAME)
    ours: list[Container] = []
    if ctx.options.warmup == "block" or warmup_user is not None:
        built = build_warmup_container(ctx)
        ours.append(fill_container(warmup_user, built) if warmup_user else built)
    built_sidecar = build_sidecar_container(ctx)
    sidecar = fill_container(sidecar_user, built_sidecar) if sidecar_user else built_sidecar
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
    ctx.notes.warn(PRIVILEGED_WARNING)
    mesh = _mesh_without_native_proxy(spec)
    if mesh:
        ctx.notes.warn(
            f"{mesh} redirects traffic to a proxy that starts after {WARMUP_NAME} and "
            f"{SIDECAR_NAME}: they cannot reach the model source; use native mesh sidecars"
        )
    if spec.get("hostNetwork") is True:
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
