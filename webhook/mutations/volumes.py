"""Pod volumes (node cache, FUSE carrier, PVC sources) and the app containers' mounts.

App containers get two kinds of mounts:

* ``modelcache-mnt`` at the mount path (read-only, ``HostToContainer``): the FUSE namespace,
  where ``<mount-path>/<name>/<file>`` is a symlink to ``APP_CACHE_ROOT/<cache-key>/<file>``;
* per model, ``modelcache-cache`` with ``subPath: models/<cache-key>/data`` at
  ``APP_CACHE_ROOT/<cache-key>`` (read-only): the symlink targets. The bytes of a model are
  then read straight from the node cache, never through the FUSE daemon, and a container sees
  only the models of its own pod (never the whole shared cache).
"""

from __future__ import annotations

import hashlib
from typing import Any

from sidecar.layout import APP_CACHE_ROOT, DATA_DIR, MODELS_DIR
from webhook.mutations.context import (
    CACHE_VOLUME,
    MNT_VOLUME,
    PVC_ROOT,
    Container,
    Context,
    Pod,
)

_NAME_MAX = 63


def pvc_volume_name(claim: str) -> str:
    """``modelcache-pvc-<claim>``, shortened with a hash when over 63 characters."""
    name = f"modelcache-pvc-{claim}"
    if len(name) <= _NAME_MAX:
        return name
    digest = hashlib.sha256(claim.encode()).hexdigest()[:8]
    return f"{name[: _NAME_MAX - 9].rstrip('-.')}-{digest}"


def pvc_claims(ctx: Context) -> list[str]:
    claims: list[str] = []
    for m in ctx.named_models:
        claim = m.source.pvc_claim
        if claim and claim not in claims:
            claims.append(claim)
    return claims


def pvc_mounts(ctx: Context) -> list[dict[str, Any]]:
    """Read-only mounts of the PVC sources, for the warm-up and the sidecar."""
    return [
        {"name": pvc_volume_name(c), "mountPath": f"{PVC_ROOT}/{c}", "readOnly": True}
        for c in pvc_claims(ctx)
    ]


def pod_volumes(ctx: Context) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [
        {
            "name": CACHE_VOLUME,
            "hostPath": {"path": ctx.config.cache_host_path, "type": "DirectoryOrCreate"},
        },
        {"name": MNT_VOLUME, "emptyDir": {}},
    ]
    for claim in pvc_claims(ctx):
        vols.append(
            {
                "name": pvc_volume_name(claim),
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
    return vols


def add_volumes(pod: Pod, ctx: Context) -> Pod:
    """Add our volumes; one the user already declared under our name is kept as is."""
    spec = pod["spec"]
    volumes = spec.get("volumes")
    if not isinstance(volumes, list):
        volumes = []
        spec["volumes"] = volumes
    present = {v.get("name") for v in volumes if isinstance(v, dict)}
    for vol in pod_volumes(ctx):
        if vol["name"] not in present:
            volumes.append(vol)
    return pod


def app_mounts(ctx: Context) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {
            "name": MNT_VOLUME,
            "mountPath": ctx.options.mount_path,
            "readOnly": True,
            "mountPropagation": "HostToContainer",
        }
    ]
    for m in ctx.named_models:
        key = m.source.cache_key
        mounts.append(
            {
                "name": CACHE_VOLUME,
                "mountPath": f"{APP_CACHE_ROOT}/{key}",
                "subPath": f"{MODELS_DIR}/{key}/{DATA_DIR}",
                "readOnly": True,
            }
        )
    return mounts


def merge_mounts(container: Container, mounts: list[dict[str, Any]]) -> None:
    """Append mounts whose mountPath the container does not use yet."""
    existing = container.get("volumeMounts")
    if not isinstance(existing, list):
        existing = []
        container["volumeMounts"] = existing
    paths = {m.get("mountPath") for m in existing if isinstance(m, dict)}
    for mount in mounts:
        if mount["mountPath"] not in paths:
            existing.append(mount)
            paths.add(mount["mountPath"])


def mount_conflict(container: Container, ctx: Context) -> str | None:
    """A user mount already at (or over) the mount path that is not ours: the reason, or None."""
    path = ctx.options.mount_path
    for m in container.get("volumeMounts") or []:
        if not isinstance(m, dict):
            continue
        mp = str(m.get("mountPath") or "").rstrip("/") or "/"
        if m.get("name") == MNT_VOLUME and mp == path:
            continue
        if mp == path or mp.startswith(path + "/"):
            return f"volume {m.get('name')!r} is already mounted at {mp}"
    return None


def mount_app_containers(pod: Pod, ctx: Context) -> Pod:
    """Mount the models into every target app container."""
    mounts = app_mounts(ctx)
    for container in pod["spec"].get("containers") or []:
        if isinstance(container, dict) and container.get("name") in ctx.targets:
            merge_mounts(container, mounts)
    return pod
