"""The ``modelcache.io/status`` annotation and the ``modelcache.io/injected`` label.

The status records what the webhook did (models with their cache keys, modes, target
containers, every rewritten value with its original, every added argument or env var). A
later admission of the same pod (reinvocation, ``inject`` on already-injected YAML) reads it
back: it restores the models and target containers (the rewritten args no longer name the
model), and the new status carries the earlier rewrites forward, so nothing changes twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_arg
from webhook.annotations import ANN_STATUS, LABEL_INJECTED
from webhook.mutations.context import Context, Pod

STATUS_VERSION: Final = 2


@dataclass(frozen=True)
class Status:
    models: tuple[NamedModel, ...]
    containers: tuple[str, ...]
    rewrites: tuple[dict[str, str], ...]
    added: tuple[dict[str, str], ...]
    warnings: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    #: the shape the pod was injected in (a status without it predates csi: hostPath)
    node_cache: str = "hostPath"


def _str_dicts(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        {str(k): str(v) for k, v in item.items()} for item in value if isinstance(item, dict)
    )


def read_status(annotations: Any) -> Status | None:
    """The status of an earlier admission, or None when absent or unreadable."""
    if not isinstance(annotations, dict):
        return None
    raw = annotations.get(ANN_STATUS)
    if not isinstance(raw, str):
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("version") != STATUS_VERSION:
        return None
    try:
        models = tuple(
            parse_model_arg(f"{m['name']}={m['uri']}")
            for m in data.get("models") or []
            if isinstance(m, dict)
        )
    except (KeyError, ModelSourceError):
        return None
    containers = data.get("containers")
    return Status(
        models=models,
        containers=tuple(str(c) for c in containers) if isinstance(containers, list) else (),
        rewrites=_str_dicts(data.get("rewrites")),
        added=_str_dicts(data.get("added")),
        warnings=tuple(str(w) for w in data.get("warnings") or [] if isinstance(w, str)),
        include=tuple(str(g) for g in data.get("include") or [] if isinstance(g, str)),
        aliases=tuple(
            (str(a[0]), str(a[1]))
            for a in data.get("ggufAliases") or []
            if isinstance(a, list) and len(a) == 2
        ),
        node_cache=str(data.get("nodeCache") or "hostPath"),
    )


def _merge(old: tuple[dict[str, str], ...], new: list[dict[str, str]]) -> list[dict[str, str]]:
    """Earlier entries then new ones, each once (linear: entries are compared as keys)."""
    out: list[dict[str, str]] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for item in (*old, *new):
        key = tuple(sorted(item.items()))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def status_json(ctx: Context) -> str:
    opts = ctx.options
    data = {
        "version": STATUS_VERSION,
        "models": [
            {"name": m.name, "uri": m.source.uri, "cacheKey": m.source.cache_key}
            for m in ctx.named_models
        ],
        "nodeCache": ctx.config.node_cache,
        "warmup": opts.warmup,
        "sidecar": opts.sidecar,
        "mountPath": opts.mount_path,
        "affinity": opts.affinity,
        "containers": list(ctx.targets),
        "include": list(opts.include),
        "ggufAliases": [list(a) for a in ctx.gguf_aliases],
        "delivery": [
            {
                "container": d.container,
                "model": d.model,
                "mode": d.mode,
                "path": d.hub_dir if d.mode == "hub-cache" else f"{opts.mount_path}/{d.model}",
            }
            for d in ctx.deliveries
        ],
        "rewrites": _merge(ctx.previous_rewrites, ctx.notes.rewrites),
        "added": _merge(ctx.previous_added, ctx.notes.added),
        "warnings": list(ctx.previous_warnings)
        if ctx.previous_warnings is not None
        else [w for w in ctx.notes.warnings if not w.startswith("detected ")],
    }
    return json.dumps(data, separators=(",", ":"))


def write_status(pod: Pod, ctx: Context) -> Pod:
    if not isinstance(pod.get("metadata"), dict):
        pod["metadata"] = {}
    meta = pod["metadata"]
    if not isinstance(meta.get("annotations"), dict):
        meta["annotations"] = {}
    if not isinstance(meta.get("labels"), dict):
        meta["labels"] = {}
    meta["annotations"][ANN_STATUS] = status_json(ctx)
    meta["labels"][LABEL_INJECTED] = "true"
    return pod
