"""What every mutation receives: the validated plan of one pod, and a collector for notes.

The pipeline builds one ``Context`` per admission after validation and detection; the
mutations read it and record warnings and rewrites into ``ctx.notes``. Mutations change the
pod they are given (the pipeline's own deep copy) and return it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from sidecar.modelsource import NamedModel
from webhook.annotations import PodOptions
from webhook.config import Config

Pod = dict[str, Any]
Container = dict[str, Any]

WARMUP_NAME: Final = "modelcache-warmup"
SIDECAR_NAME: Final = "modelcache-sidecar"
CACHE_VOLUME: Final = "modelcache-cache"
MNT_VOLUME: Final = "modelcache-mnt"
HUB_VOLUME: Final = "modelcache-hub"
#: ``nodeCache: csi``: the read-only view of the pod's models (one directory per cache key)
MODELS_VOLUME: Final = "modelcache-models"
#: ``nodeCache: csi``: the FUSE mount the node side sets up and the sidecar serves
FUSE_VOLUME: Final = "modelcache-fuse"
#: ``nodeCache: csi``: where the node side listens for the pod's warm-up and sidecar
FUSE_SOCKET_VOLUME: Final = "modelcache-fuse-socket"
CSI_DRIVER: Final = "csi.modelcache.io"
#: the mount of ``modelcache-fuse-socket`` in our containers, and the socket in it
NODE_SOCKET_DIR: Final = "/var/run/modelcache/node"
NODE_SOCKET: Final = f"{NODE_SOCKET_DIR}/socket"
SIDECAR_MOUNTPOINT: Final = "/var/run/modelcache/mnt"
#: where the sidecar writes the Hugging Face cache layout of the pod's Hub models
SIDECAR_HUB_DIR: Final = "/var/run/modelcache/hub"
#: where hub-cache app containers see the FUSE view (the targets of the snapshot symlinks):
#: a reserved path, so it never clashes with the app's own mounts
HUB_VIEW_PATH: Final = "/var/run/modelcache/view"
PVC_ROOT: Final = "/var/run/modelcache/pvc"
RESERVED_PREFIX: Final = "modelcache-"
OUR_CONTAINERS: Final = (WARMUP_NAME, SIDECAR_NAME)
#: Containers injected by service meshes: ours go after their init containers, and they are
#: never app containers.
MESH_INIT_CONTAINERS: Final = ("istio-init", "istio-proxy", "linkerd-init")
MESH_CONTAINERS: Final = ("istio-proxy", "linkerd-proxy", "istio-validation")


@dataclass
class Notes:
    """Side results of the mutations: warnings for the user, rewrites for the status."""

    warnings: list[str] = field(default_factory=list)
    rewrites: list[dict[str, str]] = field(default_factory=list)
    added: list[dict[str, str]] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


@dataclass(frozen=True)
class ModelRef:
    """A model and the strings that name it in an app container (URI, hub id, raw value)."""

    model: NamedModel
    references: tuple[str, ...]


@dataclass(frozen=True)
class Delivery:
    """How one app container reaches one model.

    ``hub-cache``: the model appears in the Hugging Face cache layout at ``hub_dir`` (the
    directory the container's Hugging Face client already uses); command and args stay as
    they are. ``path``: the model's references are rewritten to ``<mount-path>/<name>``.
    """

    container: str
    model: str
    mode: str  # "hub-cache" | "path"
    hub_dir: str | None = None
    #: set ``HF_HUB_CACHE`` to ``hub_dir`` (it came from a default, not from the container)
    set_hub_env: bool = False

    @property
    def path(self) -> str:
        return self.hub_dir or ""


@dataclass
class Context:
    config: Config
    options: PodOptions
    models: tuple[ModelRef, ...]
    #: app containers that get the mount and the rewrites
    targets: tuple[str, ...]
    #: rewrites of an earlier admission (from the status annotation), kept in the new status
    previous_rewrites: tuple[dict[str, str], ...] = ()
    previous_added: tuple[dict[str, str], ...] = ()
    notes: Notes = field(default_factory=Notes)
    deliveries: tuple[Delivery, ...] = ()
    #: env entries (and envFrom sources) of the app containers that carry credentials
    app_credentials: tuple[dict[str, Any], ...] = ()
    app_env_from: tuple[dict[str, Any], ...] = ()
    #: QoS class of the pod as submitted: our containers must not change it
    qos: str = "Burstable"
    #: llama.cpp ``-hf repo:QUANT``: (model name, quant) aliases the sidecar shows
    gguf_aliases: tuple[tuple[str, str], ...] = ()
    #: per model: warm only these globs (llama.cpp GGUF files); empty: the pod's include
    #: warnings recorded in the status of an earlier admission (kept as they were)
    previous_warnings: tuple[str, ...] | None = None
    #: per app container: what detection read (``webhook.mutations.detect.ContainerFacts``)
    facts: dict[str, Any] = field(default_factory=dict)
    #: ``nodeCache: csi``: the Secret the node side checks access with, and its key names
    node_secret: str | None = None
    credential_keys: tuple[tuple[str, str], ...] = ()

    @property
    def csi(self) -> bool:
        """Pods reach the node cache through the CSI driver (else the legacy hostPath)."""
        return self.config.node_cache == "csi"

    @property
    def hub_models(self) -> tuple[NamedModel, ...]:
        names = {d.model for d in self.deliveries if d.mode == "hub-cache"}
        return tuple(m for m in self.named_models if m.name in names)

    @property
    def on_failure(self) -> str:
        """``continue`` when every app container would fetch its models by itself without
        modelcache (hub-cache only): a failed warm-up must not stop such a pod."""
        if self.deliveries and all(d.mode == "hub-cache" for d in self.deliveries):
            return "continue"
        return "fail"

    @cached_property
    def target_set(self) -> frozenset[str]:
        """``targets`` for membership tests (a pod may have thousands of containers)."""
        return frozenset(self.targets)

    @cached_property
    def _deliveries_by_container(self) -> dict[str, tuple[Delivery, ...]]:
        out: dict[str, list[Delivery]] = {}
        for d in self.deliveries:
            out.setdefault(d.container, []).append(d)
        return {k: tuple(v) for k, v in out.items()}

    def deliveries_of(self, container: str) -> tuple[Delivery, ...]:
        return self._deliveries_by_container.get(container, ())

    def path_models(self, container: str) -> set[str]:
        return {d.model for d in self.deliveries_of(container) if d.mode == "path"}

    @property
    def named_models(self) -> tuple[NamedModel, ...]:
        return tuple(r.model for r in self.models)

    def model_path(self, model: NamedModel) -> str:
        return f"{self.options.mount_path}/{model.name}"


Mutation = Callable[[Pod, Context], Pod]


def containers_of(spec: dict[str, Any], kind: str) -> list[Container]:
    """``spec[kind]`` as a list, created when missing (kind: containers or initContainers)."""
    value = spec.get(kind)
    if not isinstance(value, list):
        value = []
        spec[kind] = value
    return value


def app_containers(spec: dict[str, Any]) -> list[Container]:
    """Regular containers that are neither ours nor a service mesh's."""
    return [
        c
        for c in spec.get("containers") or []
        if isinstance(c, dict) and c.get("name") not in (*OUR_CONTAINERS, *MESH_CONTAINERS)
    ]
