"""Model source URIs, model names and cache keys: the one contract shared by every role.

The webhook imports this module (and only this module of ``sidecar``) so that the node label
it asks for in affinity, ``cache.modelcache.io/<cache-key>``, is exactly the label the node
agent sets, and the directory the warm-up fills is exactly the one the mount serves.

Accepted sources (see docs/design.md):

``hf://org/name[@revision]``
    A Hugging Face Hub repository; revision defaults to ``main``.
``s3://bucket/prefix``
    Every object under the prefix.
``gs://bucket/prefix``
    Every object under the prefix in Google Cloud Storage, read through its S3-compatible
    XML API (``sidecar.sources.gs``).
``http://host/path/`` and ``https://host/path/``
    A directory served with nginx's JSON autoindex.
``pvc://claim/sub/path``
    A PersistentVolumeClaim mounted read-only into the warm-up and sidecar containers.
``file:///absolute/path``
    A local directory (tests, the demo, and the path a ``pvc://`` source resolves to).

Pure: no I/O, no imports beyond the standard library.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

SCHEMES: Final = ("hf", "s3", "gs", "http", "https", "pvc", "file")
DEFAULT_HF_REVISION: Final = "main"
CACHE_KEY_MAX: Final = 63
_HASH_LEN: Final = 12
_SLUG_MAX: Final = CACHE_KEY_MAX - _HASH_LEN - 1
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_HF_PART_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_S3_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Cloud Storage: 3-63 characters (up to 222 with dots, each dot-separated part at most 63),
# lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or digit
_GS_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_DNS_LABEL_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ModelSourceError(ValueError):
    """A model URI, name or list that cannot be accepted; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed, normalized model source.

    ``location`` is scheme-specific: ``org/name`` (hf), ``bucket/prefix`` (s3, gs),
    ``host[:port]/path/`` (http, https), ``claim/sub/path`` (pvc), ``/abs/path`` (file).
    ``revision`` is set for ``hf`` only.
    """

    scheme: str
    location: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        """The normalized URI; equal sources have equal URIs."""
        if self.scheme == "file":
            return f"file://{self.location}"
        base = f"{self.scheme}://{self.location}"
        return f"{base}@{self.revision}" if self.revision else base

    @property
    def hub_id(self) -> str | None:
        """``org/name`` for hub models, else None."""
        return self.location if self.scheme == "hf" else None

    @property
    def is_hub(self) -> bool:
        return self.scheme == "hf"

    @property
    def pvc_claim(self) -> str | None:
        return self.location.split("/", 1)[0] if self.scheme == "pvc" else None

    @property
    def pvc_subpath(self) -> str:
        """Path inside the claim (may be empty) for ``pvc://`` sources."""
        if self.scheme != "pvc":
            return ""
        parts = self.location.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def cache_key(self) -> str:
        return cache_key(self)

    @property
    def default_name(self) -> str:
        """The name a single, unnamed model gets: its last path segment, made name-safe."""
        segment = [p for p in self.location.split("/") if p][-1] if self.location.strip("/") else ""
        cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", segment).strip("-._")[:63].strip("-._")
        return cleaned or "model"


def _clean_path(path: str, what: str) -> str:
    parts = [p for p in path.split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise ModelSourceError(f"{what}: path segment {part!r} is not allowed")
    return "/".join(parts)


def parse_model_uri(uri: str) -> ModelSource:
    """Parse and normalize one model URI; raise ModelSourceError naming what is wrong."""
    raw = uri.strip()
    if not raw:
        raise ModelSourceError("model URI is empty")
    if any(c.isspace() for c in raw) or any(ord(c) < 32 for c in raw):
        raise ModelSourceError(f"model URI {raw!r} contains whitespace or control characters")
    if "://" not in raw:
        raise ModelSourceError(
            f"model URI {raw!r} has no scheme; accepted: " + ", ".join(f"{s}://" for s in SCHEMES)
        )
    scheme, rest = raw.split("://", 1)
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ModelSourceError(
            f"model URI {raw!r}: scheme {scheme!r} is not supported; accepted: "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        repo = repo.strip("/")
        parts = repo.split("/")
        if len(parts) not in (1, 2) or not all(_HF_PART_RE.match(p) for p in parts):
            raise ModelSourceError(f"model URI {raw!r}: expected hf://org/name[@revision]")
        if "@" in rest and not revision:
            raise ModelSourceError(f"model URI {raw!r}: empty revision after '@'")
        if revision and not re.match(r"^[A-Za-z0-9._/-]{1,200}$", revision):
            raise ModelSourceError(f"model URI {raw!r}: revision {revision!r} is not valid")
        return ModelSource("hf", repo, revision or DEFAULT_HF_REVISION)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not _S3_BUCKET_RE.match(bucket):
            raise ModelSourceError(f"model URI {raw!r}: {bucket!r} is not a valid S3 bucket name")
        prefix = _clean_path(prefix, f"model URI {raw!r}")
        return ModelSource("s3", f"{bucket}/{prefix}/" if prefix else f"{bucket}/")
    if scheme == "gs":
        bucket, _, prefix = rest.partition("/")
        if (
            not _GS_BUCKET_RE.match(bucket)
            or ("." not in bucket and len(bucket) > 63)
            or any(len(part) > 63 or not part for part in bucket.split("."))
        ):
            raise ModelSourceError(
                f"model URI {raw!r}: {bucket!r} is not a valid Cloud Storage bucket name"
            )
        prefix = _clean_path(prefix, f"model URI {raw!r}")
        return ModelSource("gs", f"{bucket}/{prefix}/" if prefix else f"{bucket}/")
    if scheme in ("http", "https"):
        split = urlsplit(raw)
        if not split.hostname:
            raise ModelSourceError(f"model URI {raw!r}: no host")
        if split.query or split.fragment:
            raise ModelSourceError(
                f"model URI {raw!r}: query strings and fragments are not allowed"
            )
        host = split.hostname.lower()
        if ":" in host:
            host = f"[{host}]"
        try:
            port = split.port
        except ValueError as exc:
            raise ModelSourceError(f"model URI {raw!r}: bad port") from exc
        default_port = 443 if scheme == "https" else 80
        netloc = host if port in (None, default_port) else f"{host}:{port}"
        path = _clean_path(split.path, f"model URI {raw!r}")
        return ModelSource(scheme, f"{netloc}/{path}/" if path else f"{netloc}/")
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not _DNS_LABEL_RE.match(claim) and not re.match(
            r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", claim
        ):
            raise ModelSourceError(f"model URI {raw!r}: {claim!r} is not a valid claim name")
        sub = _clean_path(sub, f"model URI {raw!r}")
        return ModelSource("pvc", f"{claim}/{sub}" if sub else claim)
    # file
    if not rest.startswith("/"):
        raise ModelSourceError(f"model URI {raw!r}: expected file:///absolute/path")
    path = _clean_path(rest, f"model URI {raw!r}")
    return ModelSource("file", "/" + path)


def hub_id_to_uri(value: str) -> str | None:
    """``org/name`` (a Hugging Face id as vLLM and TGI accept it) → ``hf://org/name``, else None.

    Absolute or relative filesystem paths (``/models/x``, ``./x``) are not hub ids.
    """
    if value.startswith(("/", ".", "~")) or "://" in value:
        return None
    parts = value.split("/")
    if len(parts) != 2 or not all(_HF_PART_RE.match(p) for p in parts):
        return None
    return f"hf://{value}"


def cache_key(source: ModelSource) -> str:
    """A stable, label-safe key: readable slug + hash of the normalized URI, ≤ 63 chars.

    Valid as the name part of a label key (``cache.modelcache.io/<key>``) and as a directory
    name. The hash covers scheme, location and revision, so two revisions never share a key.
    """
    digest = hashlib.sha256(source.uri.encode()).hexdigest()[:_HASH_LEN]
    base = source.location.rstrip("/")
    if source.scheme in ("http", "https"):
        base = base.split("/", 1)[1] if "/" in base else base
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    if source.revision and source.revision != DEFAULT_HF_REVISION:
        rev = re.sub(r"[^a-z0-9]+", "-", source.revision.lower()).strip("-")[:12]
        slug = f"{slug}-{rev}" if slug else rev
    # keep the tail of long slugs: model names carry more meaning than org or bucket names
    slug = slug[-_SLUG_MAX:].strip("-") or source.scheme
    return f"{slug}-{digest}"


def validate_model_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ModelSourceError(
            f"model name {name!r} is not valid: 1-63 characters of letters, digits, '.', '_', '-'"
            ", starting and ending with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class NamedModel:
    """One entry of a model list: the directory name under the mount and its source."""

    name: str
    source: ModelSource

    def to_arg(self) -> str:
        """The ``NAME=URI`` form the sidecar's ``--model`` flag takes."""
        return f"{self.name}={self.source.uri}"


def parse_model_spec(value: str) -> list[NamedModel]:
    """Parse ``modelcache.io/model`` or a ``--model`` value list.

    Either one URI (named after its last path segment) or ``name=uri,name=uri`` (base model
    first, then LoRA adapters or draft models). Names and cache keys must be unique.
    """
    text = value.strip()
    if not text:
        raise ModelSourceError("model list is empty")
    entries = [e.strip() for e in text.split(",")]
    if any(not e for e in entries):
        raise ModelSourceError(f"model list {value!r} has an empty entry")
    models: list[NamedModel] = []
    for entry in entries:
        head = entry.split("://", 1)[0]
        if "=" in head:
            name, _, uri = entry.partition("=")
            models.append(NamedModel(validate_model_name(name.strip()), parse_model_uri(uri)))
        else:
            if len(entries) > 1:
                raise ModelSourceError(
                    f"model list {value!r}: with several models every entry must be name=uri"
                )
            src = parse_model_uri(entry)
            models.append(NamedModel(src.default_name, src))
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ModelSourceError(f"model list {value!r}: duplicate name(s) {', '.join(dup)}")
    return models


def parse_model_arg(value: str) -> NamedModel:
    """One ``--model NAME=URI`` command-line value."""
    name, sep, uri = value.partition("=")
    if not sep or "://" in name:
        raise ModelSourceError(f"--model {value!r}: expected NAME=URI")
    return NamedModel(validate_model_name(name), parse_model_uri(uri))
