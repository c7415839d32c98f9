"""Pod volumes (node cache, FUSE carrier, PVC sources) and the app containers' mounts.

``nodeCache: csi`` (the default): the node cache reaches the pod only through two inline
volumes of the CSI driver ``csi.modelcache.io`` (a volume type PodSecurity ``restricted``
allows), published by the node agent after it checked the pod's access with the pod's own
credentials (``nodePublishSecretRef``):

* ``modelcache-models`` (``kind: view``): a read-only tmpfs with one directory per model
  named by cache key, each a read-only bind of the model's complete files;
* ``modelcache-fuse`` (``kind: fuse``): a FUSE mount set up by the node side, whose
  descriptor the unprivileged sidecar receives through a socket in the
  ``modelcache-fuse-socket`` emptyDir and serves (the ``<name>/<file>`` namespace, complete
  files as symlinks into the view).

App containers mount ``modelcache-fuse`` where the legacy shape mounted ``modelcache-mnt``
(the mount path for path delivery, ``HUB_VIEW_PATH`` for hub-cache delivery) and
``modelcache-models`` at ``APP_CACHE_ROOT`` (the symlink targets), all read-only, plus the
``modelcache-hub`` subPath mounts below.

``nodeCache: hostPath`` (legacy: it trusts every pod of enabled namespaces with every model
on the node). App containers get these mounts:

* ``modelcache-mnt`` at the mount path (read-only, ``HostToContainer``) for path delivery:
  the FUSE namespace, where ``<mount-path>/<name>/<file>`` is a symlink to
  ``APP_CACHE_ROOT/<cache-key>/<file>``; for hub-cache delivery the same view at the reserved
  ``HUB_VIEW_PATH`` (it is only the target of the snapshot symlinks, so it never clashes with
  the app's own mounts);
* per model, ``modelcache-cache`` with ``subPath: models/<cache-key>/data`` at
  ``APP_CACHE_ROOT/<cache-key>`` (read-only): the symlink targets. The bytes of a model are
  then read straight from the node cache, never through the FUSE daemon, and a container sees
  only the models of its own pod (never the whole shared cache);
* per Hub model delivered in the Hugging Face cache layout, ``modelcache-hub`` (an emptyDir:
  per pod, writable) with ``subPath: models--org--name`` at ``<hub dir>/models--org--name``.
  The sidecar writes ``refs/<revision>`` and ``snapshots/<commit>/<file>`` there (symlinks
  into the view); the rest of the app's cache directory stays the app's own, so adapters and
  draft models it downloads land beside the model as before.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

from sidecar.layout import APP_CACHE_ROOT, DATA_DIR, MODELS_DIR
from webhook.mutations.context import (
    CACHE_VOLUME,
    CSI_DRIVER,
    FUSE_SOCKET_VOLUME,
    FUSE_VOLUME,
    HUB_VIEW_PATH,
    HUB_VOLUME,
    MNT_VOLUME,
    MODELS_VOLUME,
    PVC_ROOT,
    Container,
    Context,
    Pod,
)

#: the volumeAttributes keys the node plugin reads
KIND_VIEW: Final = "view"
KIND_FUSE: Final = "fuse"

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


def file_roots_used(ctx: Context) -> list[str]:
    """The configured ``fileRoots`` that this pod's ``file://`` models live under."""
    roots: list[str] = []
    for m in ctx.named_models:
        if m.source.scheme != "file":
            continue
        path = m.source.location.rstrip("/")
        for r in ctx.config.file_roots:
            root = r.rstrip("/") or "/"
            if (path == root or path.startswith(root.rstrip("/") + "/")) and root not in roots:
                roots.append(root)
    return roots


def file_root_volume_name(root: str) -> str:
    return "modelcache-file-" + hashlib.sha256(root.encode()).hexdigest()[:12]


def file_root_mounts(ctx: Context) -> list[dict[str, Any]]:
    """Read-only mounts of the allowed roots the pod's file:// models use (warm-up, sidecar)."""
    return [
        {"name": file_root_volume_name(r), "mountPath": r, "readOnly": True}
        for r in file_roots_used(ctx)
    ]


def csi_volume(ctx: Context, name: str, kind: str) -> dict[str, Any]:
    """An inline volume of the node plugin: the pod's models, its include globs, and the
    Secret (with its key names) the node side checks the pod's access with."""
    attributes = {"kind": kind, "models": ",".join(m.to_arg() for m in ctx.named_models)}
    if ctx.options.include:
        attributes["include"] = ",".join(ctx.options.include)
    if ctx.credential_keys:
        attributes["credentialKeys"] = ",".join(f"{v}={k}" for v, k in ctx.credential_keys)
    csi: dict[str, Any] = {"driver": CSI_DRIVER, "readOnly": True, "volumeAttributes": attributes}
    if ctx.node_secret:
        csi["nodePublishSecretRef"] = {"name": ctx.node_secret}
    return {"name": name, "csi": csi}


def _csi_pod_volumes(ctx: Context) -> list[dict[str, Any]]:
    vols = [
        csi_volume(ctx, MODELS_VOLUME, KIND_VIEW),
        csi_volume(ctx, FUSE_VOLUME, KIND_FUSE),
        {"name": FUSE_SOCKET_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    if ctx.hub_models:
        vols.append({"name": HUB_VOLUME, "emptyDir": {}})
    return vols


def pod_volumes(ctx: Context) -> list[dict[str, Any]]:
    if ctx.csi:
        return _csi_pod_volumes(ctx)
    vols: list[dict[str, Any]] = [
        {
            "name": CACHE_VOLUME,
            "hostPath": {"path": ctx.config.cache_host_path, "type": "DirectoryOrCreate"},
        },
        {"name": MNT_VOLUME, "emptyDir": {}},
    ]
    if ctx.hub_models:
        vols.append({"name": HUB_VOLUME, "emptyDir": {}})
    for root in file_roots_used(ctx):
        vols.append(
            {"name": file_root_volume_name(root), "hostPath": {"path": root, "type": "Directory"}}
        )
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


def hub_repo_dir(hub_id: str) -> str:
    """The Hugging Face cache folder of a model repository: ``models--org--name``."""
    return "models--" + hub_id.replace("/", "--")


def app_mounts(ctx: Context, container: str) -> list[dict[str, Any]]:
    """The mounts of one app container, by how it reaches its models (see ``Delivery``)."""
    deliveries = ctx.deliveries_of(container)
    mounts: list[dict[str, Any]] = []
    # csi: the node side mounted the FUSE connection, nothing propagates from the sidecar
    view: dict[str, Any] = (
        {"name": FUSE_VOLUME, "readOnly": True}
        if ctx.csi
        else {"name": MNT_VOLUME, "readOnly": True, "mountPropagation": "HostToContainer"}
    )
    if any(d.mode == "path" for d in deliveries):
        mounts.append(_at(view, ctx.options.mount_path))
    hub = [d for d in deliveries if d.mode == "hub-cache"]
    if hub:
        mounts.append(_at(view, HUB_VIEW_PATH))
    if ctx.csi:
        mounts.append({"name": MODELS_VOLUME, "mountPath": APP_CACHE_ROOT, "readOnly": True})
    for m in ctx.named_models if not ctx.csi else ():
        key = m.source.cache_key
        mounts.append(
            {
                "name": CACHE_VOLUME,
                "mountPath": f"{APP_CACHE_ROOT}/{key}",
                "subPath": f"{MODELS_DIR}/{key}/{DATA_DIR}",
                "readOnly": True,
            }
        )
    models = {m.name: m for m in ctx.named_models}
    for d in hub:
        hub_id = models[d.model].source.hub_id
        if hub_id and d.hub_dir:
            folder = hub_repo_dir(hub_id)
            mounts.append(
                {"name": HUB_VOLUME, "mountPath": f"{d.hub_dir}/{folder}", "subPath": folder}
            )
    return mounts


def _at(mount: dict[str, Any], path: str) -> dict[str, Any]:
    """``mount`` at ``path`` (name, mountPath, then the rest, as the API server prints it)."""
    return {
        "name": mount["name"],
        "mountPath": path,
        **{k: v for k, v in mount.items() if k != "name"},
    }


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
        if m.get("name") in (MNT_VOLUME, FUSE_VOLUME) and mp == path:
            continue
        if mp == path or mp.startswith(path + "/"):
            return f"volume {m.get('name')!r} is already mounted at {mp}"
    return None


def mount_app_containers(pod: Pod, ctx: Context) -> Pod:
    """Mount the models into every target app container."""
    for container in pod["spec"].get("containers") or []:
        if isinstance(container, dict) and container.get("name") in ctx.target_set:
            merge_mounts(container, app_mounts(ctx, str(container["name"])))
    return pod
