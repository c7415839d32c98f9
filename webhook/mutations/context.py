"""What every mutation receives: the validated plan of one pod, and a collector for notes.

The pipeline builds one ``Context`` per admission after validation and detection; the
mutations read it and record warnings and rewrites into ``ctx.notes``. Mutations change the
pod they are given (the pipeline's own deep copy) and return it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
SIDECAR_MOUNTPOINT: Final = "/var/run/modelcache/mnt"
PVC_ROOT: Final = "/var/run/modelcache/pvc"
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
