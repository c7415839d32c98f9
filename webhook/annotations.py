"""Every user-facing label and annotation key, and the one table that validates them.

The table (``ANNOTATIONS``) is the single source of truth: ``parse_pod_options`` validates
with it, ``docs/annotations.md`` is checked against it by a test, and a denial message is
built from it (key, bad value, accepted values).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_spec
from webhook.config import Config

PREFIX: Final = "modelcache.io/"

# labels
NAMESPACE_LABEL_INJECTION: Final = "modelcache.io/injection"
LABEL_INJECT: Final = "modelcache.io/inject"
LABEL_INJECTED: Final = "modelcache.io/injected"
NODE_LABEL_PREFIX: Final = "cache.modelcache.io/"

# annotations set by users
ANN_MODEL: Final = "modelcache.io/model"
ANN_WARMUP: Final = "modelcache.io/warmup"
ANN_WARMUP_TIMEOUT: Final = "modelcache.io/warmup-timeout"
ANN_WARMUP_INCLUDE: Final = "modelcache.io/warmup-include"
ANN_AFFINITY: Final = "modelcache.io/affinity"
ANN_REWRITE: Final = "modelcache.io/rewrite"
ANN_CONTAINERS: Final = "modelcache.io/containers"
ANN_SIDECAR: Final = "modelcache.io/sidecar"
ANN_MOUNT_PATH: Final = "modelcache.io/mount-path"
# annotations written by the webhook
ANN_STATUS: Final = "modelcache.io/status"
ANN_SKIPPED: Final = "modelcache.io/skipped"

#: Keys under ``modelcache.io/`` that are ours but not user options: allowed as annotations.
#: ``modelcache.io/inject`` is honoured as an annotation too (``"false"`` opts the pod out),
#: since every other setting is an annotation and users write it so.
RESERVED_KEYS: Final = (ANN_STATUS, ANN_SKIPPED, LABEL_INJECT, LABEL_INJECTED)

_DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_GLOB: Final = re.compile(r"^[A-Za-z0-9._*?\[\]/!-]+$")
_MAX_TIMEOUT: Final = 86400
#: Nothing may be mounted at or under these: the system's own trees.
_FORBIDDEN_MOUNT_ROOTS: Final = (
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/boot",
    "/run",
    "/var/run",
    "/var/lib",
    "/var/run/modelcache",
)
#: Directories apps rely on: a mount exactly there (or above them) would hide them.
_FORBIDDEN_MOUNT_DIRS: Final = ("/tmp", "/var", "/var/tmp", "/root", "/home", "/opt", "/srv")
_HUB_WEB: Final = re.compile(
    r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?!api/|datasets/|spaces/)"
    r"([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:/(?:tree|blob|resolve)/([^/]+))?"
)


class AnnotationError(ValueError):
    """A user error in a label or annotation: names the key, the value and what is accepted."""

    def __init__(
        self, key: str, value: str, accepted: str, detail: str = "", *, unknown: bool = False
    ) -> None:
        self.key = key
        self.value = value
        self.accepted = accepted
        if unknown:
            message = f"{key}: unknown annotation (value {value!r}); accepted keys: {accepted}"
        else:
            why = f": {detail}" if detail else ""
            message = f"{key}: invalid value {value!r}{why}; accepted: {accepted}"
        super().__init__(message)


@dataclass(frozen=True)
class AnnotationSpec:
    key: str
    meaning: str
    default: str
    accepted: str
    parse: Callable[[str, Config], Any]


def _choice(*values: str) -> Callable[[str, Config], str]:
    def parse(raw: str, _config: Config) -> str:
        value = raw.strip()
        if value not in values:
            raise ValueError("")
        return value

    return parse


def _hint(uri: str) -> str | None:
    """A ``did you mean`` for values users commonly write instead of an ``hf://`` URI."""
    m = _HUB_WEB.match(uri)
    if m:
        rev = f"@{m.group(2)}" if m.group(2) else ""
        return f"did you mean hf://{m.group(1)}{rev}? (a Hub web page is not a file listing)"
    if "://" not in uri and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+", uri):
        return f"did you mean hf://{uri}?"
    return None


def _parse_models(raw: str, config: Config) -> tuple[NamedModel, ...]:
    for entry in raw.split(","):
        value = entry.strip()
        head = value.split("://", 1)[0]
        uri = value.split("=", 1)[1].strip() if "=" in head else value
        hint = _hint(uri)
        if hint:
            raise ValueError(hint)
    try:
        models = tuple(parse_model_spec(raw))
    except ModelSourceError as exc:
        raise ValueError(str(exc)) from exc
    for m in models:
        if m.source.scheme != "file":
            continue
        path = m.source.location.rstrip("/")
        roots = [r.rstrip("/") for r in config.file_roots]
        if not any(path == r or path.startswith(r + "/") for r in roots):
            allowed = ", ".join(config.file_roots) or "none (the cluster config sets fileRoots)"
            raise ValueError(
                f"file:// source {m.source.uri} is outside the allowed roots: {allowed}"
            )
    return models


def _parse_timeout(raw: str, _config: Config) -> int:
    value = raw.strip()
    if not value.isdigit() or not 1 <= int(value) <= _MAX_TIMEOUT:
        raise ValueError("")
    return int(value)


def _split_list(raw: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in raw.split(","))
    if not raw.strip() or any(not p for p in items):
        raise ValueError("empty entry in the list")
    return items


def _parse_include(raw: str, _config: Config) -> tuple[str, ...]:
    items = _split_list(raw)
    bad = [p for p in items if not _GLOB.match(p)]
    if bad:
        raise ValueError(f"glob {bad[0]!r} has characters outside [A-Za-z0-9._*?[]/!-]")
    return items


def _parse_containers(raw: str, _config: Config) -> tuple[str, ...]:
    items = _split_list(raw)
    bad = [p for p in items if not _DNS_LABEL.match(p)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a container name")
    return items


def _parse_mount_path(raw: str, _config: Config) -> str:
    value = raw.strip()
    if not value.startswith("/") or value.rstrip("/") == "":
        raise ValueError("")
    parts = value.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts) or not all(
        re.match(r"^[A-Za-z0-9._-]+$", p) for p in parts
    ):
        raise ValueError("")
    norm = "/" + "/".join(parts)
    for root in _FORBIDDEN_MOUNT_ROOTS:
        if norm == root or norm.startswith(root + "/") or root.startswith(norm + "/"):
            raise ValueError(f"{root} is a system directory")
    for d in _FORBIDDEN_MOUNT_DIRS:
        if norm == d or d.startswith(norm + "/"):
            raise ValueError(f"a mount at {norm} would hide {d}, which apps rely on")
    return norm


ANNOTATIONS: Final[tuple[AnnotationSpec, ...]] = (
    AnnotationSpec(
        ANN_MODEL,
        "model source, or a list `name=uri,...` (base model first, then LoRA/draft models)",
        "auto-detected from the app's args/env",
        "`hf://org/name[@rev]`, `s3://bucket/prefix`, `gs://bucket/prefix`, "
        "`http(s)://host/path/`, `pvc://claim/sub/path`, `file:///path` (under the cluster's "
        "`fileRoots` only), or `name=uri,name=uri`",
        _parse_models,
    ),
    AnnotationSpec(
        ANN_WARMUP,
        "block: the app starts after the model is in the node cache; async: the app starts at "
        "once and reads through the sidecar while it fills; off: fetch on demand only",
        "block",
        "block, async, off",
        _choice("block", "async", "off"),
    ),
    AnnotationSpec(
        ANN_WARMUP_TIMEOUT,
        "seconds before the warm-up gives up (the pod then fails loudly, never half-loaded)",
        "1800 (cluster config)",
        f"an integer number of seconds from 1 to {_MAX_TIMEOUT}",
        _parse_timeout,
    ),
    AnnotationSpec(
        ANN_WARMUP_INCLUDE,
        "comma list of globs of the files to fetch",
        "all files",
        "comma-separated globs, e.g. `*.json,*.safetensors`",
        _parse_include,
    ),
    AnnotationSpec(
        ANN_AFFINITY,
        "steer the pod to nodes whose cache holds the model (node label "
        "`cache.modelcache.io/<cache-key>=ready`)",
        "prefer",
        "prefer, require, off",
        _choice("prefer", "require", "off"),
    ),
    AnnotationSpec(
        ANN_REWRITE,
        "how app containers reach the model: auto: Hub models read by a Hugging Face client "
        "appear in its cache directory (args untouched), others by a framework-aware path "
        "rewrite of args/command/env; path: always rewrite to `<mount-path>/<name>`; off: "
        "never rewrite",
        "auto",
        "auto, path, off",
        _choice("auto", "path", "off"),
    ),
    AnnotationSpec(
        ANN_CONTAINERS,
        "comma list of app containers that get the mount and the rewrites",
        "containers that reference the model, else all app containers",
        "comma-separated names of containers of the pod",
        _parse_containers,
    ),
    AnnotationSpec(
        ANN_SIDECAR,
        "native: init container with restartPolicy Always (Kubernetes >= 1.29); classic: first "
        "regular container with a blocking postStart",
        "native (cluster config)",
        "native, classic",
        _choice("native", "classic"),
    ),
    AnnotationSpec(
        ANN_MOUNT_PATH,
        "where models appear in app containers (`<mount-path>/<name>`)",
        "/models",
        "an absolute path without `..`, not under a system directory (`/proc`, `/sys`, "
        "`/dev`, `/etc`, `/usr`, `/bin`, `/sbin`, `/lib`, `/boot`, `/run`, `/var/run`, "
        "`/var/lib`) and not at or above `/tmp`, `/var`, `/root`, `/home`, `/opt`, `/srv`",
        _parse_mount_path,
    ),
)

SPECS: Final[Mapping[str, AnnotationSpec]] = {s.key: s for s in ANNOTATIONS}


@dataclass(frozen=True)
class PodOptions:
    """The validated options of one pod: annotations with cluster defaults filled in."""

    models: tuple[NamedModel, ...] | None  # None: detect from the app containers
    warmup: str
    warmup_timeout: int
    include: tuple[str, ...]
    affinity: str
    rewrite: str
    containers: tuple[str, ...] | None
    sidecar: str
    mount_path: str


def _as_mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def check_inject_label(labels: object) -> str | None:
    """The value of the ``modelcache.io/inject`` label, validated ("true"/"false"/None)."""
    value = _as_mapping(labels).get(LABEL_INJECT)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise AnnotationError(LABEL_INJECT, str(value), '"true" or "false" (a pod label)')
    return str(value)


def check_inject_annotation(annotations: object) -> str | None:
    """``modelcache.io/inject`` written as an annotation: honoured like the label."""
    value = _as_mapping(annotations).get(LABEL_INJECT)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise AnnotationError(LABEL_INJECT, str(value), '"true" or "false"')
    return str(value)


def parse_pod_options(annotations: object, config: Config) -> PodOptions:
    """Validate every ``modelcache.io/*`` annotation; raise AnnotationError on the first bad one.

    Keys are checked in table order so the message is deterministic; an unknown key under
    ``modelcache.io/`` is an error too (a typo must not silently change nothing).
    """
    ann = _as_mapping(annotations)
    for key in sorted(k for k in ann if isinstance(k, str) and k.startswith(PREFIX)):
        if key not in SPECS and key not in RESERVED_KEYS:
            raise AnnotationError(
                key,
                str(ann[key]),
                ", ".join(s.key for s in ANNOTATIONS),
                unknown=True,
            )
    parsed: dict[str, Any] = {}
    for spec in ANNOTATIONS:
        if spec.key not in ann:
            continue
        raw = ann[spec.key]
        if not isinstance(raw, str):
            raise AnnotationError(spec.key, str(raw), spec.accepted, "not a string")
        try:
            parsed[spec.key] = spec.parse(raw, config)
        except ValueError as exc:
            raise AnnotationError(spec.key, raw, spec.accepted, str(exc)) from exc
    return PodOptions(
        models=parsed.get(ANN_MODEL),
        warmup=parsed.get(ANN_WARMUP, "block"),
        warmup_timeout=parsed.get(ANN_WARMUP_TIMEOUT, config.warmup_timeout),
        include=parsed.get(ANN_WARMUP_INCLUDE, ()),
        affinity=parsed.get(ANN_AFFINITY, "prefer"),
        rewrite=parsed.get(ANN_REWRITE, "auto"),
        containers=parsed.get(ANN_CONTAINERS),
        sidecar=parsed.get(ANN_SIDECAR, config.sidecar_mode),
        mount_path=parsed.get(ANN_MOUNT_PATH, config.default_mount_path),
    )


def annotation_table_markdown() -> str:
    """The annotation table of ``docs/annotations.md`` (a test keeps the doc equal to it)."""
    rows = ["| key | meaning | default | accepted values |", "|---|---|---|---|"]
    for s in ANNOTATIONS:
        rows.append(f"| `{s.key}` | {s.meaning} | {s.default} | {s.accepted} |")
    return "\n".join(rows) + "\n"
