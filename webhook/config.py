"""Webhook configuration: one YAML file, every field defaulted, unknown keys rejected.

``serve`` and ``inject`` run with no file at all (``load_config(None)``). Keys may be written
in snake_case or camelCase (``sidecarImage`` / ``sidecar_image``), as Kubernetes users write
camelCase in ConfigMaps while Python code reads snake_case attributes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

DEFAULT_SIDECAR_IMAGE = "ghcr.io/modelcache/sidecar:0.1.0"
DEFAULT_CACHE_HOST_PATH = "/var/lib/modelcache"
DEFAULT_MOUNT_PATH = "/models"
DEFAULT_WARMUP_TIMEOUT = 1800
WEBHOOK_NAMESPACE = "modelcache-system"
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and the bad key."""


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, alias_generator=to_camel
    )


class Resources(_Model):
    """Kubernetes ResourceRequirements of one of our containers (quantities as strings)."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)

    def to_k8s(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.limits:
            out["limits"] = dict(self.limits)
        if self.requests:
            out["requests"] = dict(self.requests)
        return out


class SecretEnv(_Model):
    """Credentials of one source scheme: a Secret in the pod's namespace and its keys.

    ``keys`` maps a key of the Secret to the env var our containers get from it
    (``valueFrom.secretKeyRef`` with ``optional: true``, so a pod of a public model starts
    without the Secret). ``secret_name: null`` disables credentials for the scheme.
    """

    secret_name: str | None
    keys: dict[str, str] = Field(default_factory=dict)


def _s3() -> SecretEnv:
    keys = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
    )
    return SecretEnv(secret_name="modelcache-s3-credentials", keys={k: k for k in keys})


def _hf() -> SecretEnv:
    keys = ("HF_TOKEN", "HF_ENDPOINT")
    return SecretEnv(secret_name="modelcache-hf-credentials", keys={k: k for k in keys})


def _gs() -> SecretEnv:
    # Cloud Storage through its S3-compatible API with an HMAC key
    keys = ("GCS_ACCESS_KEY_ID", "GCS_SECRET_ACCESS_KEY", "GCS_ENDPOINT_URL")
    return SecretEnv(secret_name="modelcache-gcs-credentials", keys={k: k for k in keys})


def _http() -> SecretEnv:
    # the sidecar's http(s) source sends no credentials (internal mirrors, presigned paths):
    # nothing to inject unless a cluster configures a Secret for its own image
    return SecretEnv(secret_name=None)


class Credentials(_Model):
    """Per source scheme (``http`` covers ``https`` too); ``pvc`` and ``file`` need none."""

    s3: SecretEnv = Field(default_factory=_s3)
    gs: SecretEnv = Field(default_factory=_gs)
    hf: SecretEnv = Field(default_factory=_hf)
    http: SecretEnv = Field(default_factory=_http)

    def for_scheme(self, scheme: str) -> SecretEnv | None:
        if scheme == "s3":
            return self.s3
        if scheme == "gs":
            return self.gs
        if scheme == "hf":
            return self.hf
        if scheme in ("http", "https"):
            return self.http
        return None


def _warmup_resources() -> Resources:
    return Resources(requests={"cpu": "250m", "memory": "256Mi"}, limits={"memory": "1Gi"})


def _sidecar_resources() -> Resources:
    return Resources(requests={"cpu": "50m", "memory": "128Mi"}, limits={"memory": "1Gi"})


class Config(_Model):
    """Cluster-wide settings of the webhook (the ``config.yaml`` of the ConfigMap)."""

    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    #: ``native`` needs Kubernetes >= 1.29 (init container with restartPolicy Always).
    sidecar_mode: Literal["native", "classic"] = "native"
    #: How pods reach the node cache. ``csi``: through inline volumes of the CSI driver
    #: ``csi.modelcache.io`` (everything injected meets PodSecurity ``restricted``; the node
    #: agent checks each pod's access with the pod's own credentials). ``hostPath``: the
    #: legacy shape (a privileged sidecar and a hostPath to the cache), which trusts every pod
    #: of enabled namespaces with every model on the node.
    node_cache: Literal["csi", "hostPath"] = "csi"
    #: ``nodeCache: csi`` only: the Secret (in the pod's namespace) handed to the node side
    #: as the pod's credentials when the app has none of its own. It must exist in every
    #: enabled namespace: the kubelet holds a pod whose ``nodePublishSecretRef`` names a
    #: missing Secret in ContainerCreating. None: pods without credentials send none.
    fallback_credentials_secret: str | None = None
    #: ``nodeCache: hostPath`` only: the node cache directory on the node.
    cache_host_path: str = DEFAULT_CACHE_HOST_PATH
    default_mount_path: str = DEFAULT_MOUNT_PATH
    warmup_timeout: int = Field(default=DEFAULT_WARMUP_TIMEOUT, ge=1, le=86400)
    warmup_resources: Resources = Field(default_factory=_warmup_resources)
    sidecar_resources: Resources = Field(default_factory=_sidecar_resources)
    #: ``nodeCache: hostPath`` only: per-scheme Secrets our containers read credentials from
    #: when the app has none (in ``csi`` mode see ``fallbackCredentialsSecret``).
    credentials: Credentials = Field(default_factory=Credentials)
    #: What the server answers when the mutation fails with an internal error.
    on_error: Literal["allow", "deny"] = "allow"
    max_request_bytes: int = Field(default=3 * 1024 * 1024, ge=1024)
    excluded_namespaces: tuple[str, ...] = ("kube-system", "kube-node-lease", WEBHOOK_NAMESPACE)
    #: Whether the node agent DaemonSet labels nodes; without it ``require`` affinity can
    #: never be satisfied, so the webhook warns.
    agent_enabled: bool = False
    #: Directories ``file://`` model sources may name (none by default: a file:// source
    #: reads the node's disk, so only an admin may allow it, and only where models live).
    file_roots: tuple[str, ...] = ()
    #: Serve a complete cached model while its source is unreachable even to pods that send
    #: credentials. Off: then the listing with the pod's own credentials is the only proof
    #: that the pod may still read a private model (a revoked token, a deleted repository);
    #: on, any pod that names a cached private model gets it during an outage.
    serve_cached_when_unreachable: bool = False
    # --- the admission server under load (docs/webhook-server.md) --------------------------
    # The API server gives a webhook ``timeoutSeconds`` (at most 5) for the whole call; a
    # request still being sent after header + body timeouts (5 s together) has already been
    # given up on, so cutting it loses nothing and frees its connection.
    #: Seconds a connection gets for its TLS handshake and for the request line and headers
    #: (from connect, or from the first byte of a later request on a kept-alive connection).
    header_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    #: Seconds a request gets to deliver its body once the headers are in.
    body_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    #: Seconds a kept-alive connection may sit idle between requests.
    idle_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Open connections at most; more wait in the kernel's accept queue.
    max_connections: int = Field(default=1024, ge=1, le=65536)
    #: Admissions (bodies complete) being decided at once; more are answered 503 at once.
    max_requests_in_flight: int = Field(default=64, ge=1, le=4096)
    #: Kubernetes Events for decisions: ``auto`` records them when running in a cluster.
    events: Literal["auto", "on", "off"] = "auto"
    #: Events waiting to be sent at most; when full, new ones are dropped (and counted).
    event_queue_size: int = Field(default=256, ge=1, le=65536)

    @field_validator("cache_host_path", "default_mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") == "":
            raise ValueError(f"must be an absolute path other than '/', got {value!r}")
        return value.rstrip("/")

    @field_validator("fallback_credentials_secret")
    @classmethod
    def _secret_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value)):
            raise ValueError(f"must be a Secret name (a DNS subdomain), got {value!r}")
        return value


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_config(path: str | None) -> Config:
    """Read the config file; ``None`` (or an empty file) gives the defaults.

    Raises ConfigError naming the file and the offending key.
    """
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML: {exc}") from exc
    if data is None:
        return Config()
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"config {path}: {problems}") from exc
