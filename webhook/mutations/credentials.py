"""The credentials the node side checks a pod's access with (``nodeCache: csi``).

The node agent fetches into a cache shared by every namespace, so before it publishes a
model to a pod it lists the source with that pod's own credentials. The kubelet hands it
exactly one thing of the pod's: the data of the Secret named by the volume's
``nodePublishSecretRef`` (a Secret of the pod's namespace). So the app's credentials must
come from ONE Secret:

* ``env`` entries with ``valueFrom.secretKeyRef`` of one Secret: that Secret, and
  ``credentialKeys`` (``HF_TOKEN=token``) where a key is not named like its variable;
* ``envFrom`` with a ``secretRef``: that Secret, whose keys are the variables' names less
  the ``envFrom`` prefix;
* none: no Secret (or the cluster's fallback Secret, ``fallbackCredentialsSecret``).

Credentials from two or more Secrets, from an ``optional: true`` Secret reference (the app
starts without that Secret; a ``nodePublishSecretRef`` to it would not), or written into
the pod spec as a literal value (or taken from a ConfigMap), cannot reach the node side:
the pod is left alone, with the variable and the reason in ``modelcache.io/skipped``, since
a private model would otherwise hold the pod in ContainerCreating. Only the variables of
the pod's models' schemes count (an ``HF_TOKEN`` does not matter to an ``s3://`` model).
Endpoints never come from the pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sidecar.modelsource import NamedModel
from webhook.mutations.context import Container

#: The variables each source scheme reads its credentials from; the first one decides
#: whether the app sets the scheme's credentials explicitly (then ``envFrom`` Secrets
#: cannot be where they come from).
SCHEME_CREDENTIAL_ENV: Final[dict[str, tuple[str, ...]]] = {
    "hf": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    "gs": ("GCS_ACCESS_KEY_ID", "GCS_SECRET_ACCESS_KEY"),
}
#: The credential names the node plugin takes from a pod's Secret (``credentialKeys``
#: names only these; a test keeps the list equal to the plugin's own).
NODE_CREDENTIAL_ENV: Final = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


@dataclass(frozen=True)
class NodeCredentials:
    """What the csi volumes carry: the Secret and the keys that differ from the names."""

    secret: str | None = None
    #: (variable, key of the Secret) where the key is not the variable's name
    keys: tuple[tuple[str, str], ...] = ()

    @property
    def credential_keys(self) -> str:
        """The ``credentialKeys`` volume attribute ("" when every key is its name)."""
        return ",".join(f"{var}={key}" for var, key in self.keys)


def _relevant(models: tuple[NamedModel, ...]) -> list[str]:
    out: list[str] = []
    for m in models:
        for var in SCHEME_CREDENTIAL_ENV.get(m.source.scheme, ()):
            if var not in out:
                out.append(var)
    return out


def _explicit(container: Container, relevant: list[str]) -> dict[str, dict[str, Any]]:
    """The container's own env entries of the relevant variables (a later one wins, as the
    kubelet resolves duplicates)."""
    out: dict[str, dict[str, Any]] = {}
    for item in container.get("env") or []:
        if isinstance(item, dict) and item.get("name") in relevant:
            out[str(item["name"])] = item
    return out


def _entry_source(container: str, var: str, entry: dict[str, Any]) -> tuple[str, str] | str | None:
    """(Secret, key) of one env entry, None when it sets no credential, or why the node side
    cannot receive it."""
    value_from = entry.get("valueFrom")
    if not isinstance(value_from, dict):
        if not entry.get("value"):
            return None
        return (
            f"container {container} sets {var} as a literal value in the pod spec; the node "
            "cache receives credentials only from a Secret (nodePublishSecretRef): take it "
            "from a Secret with valueFrom.secretKeyRef"
        )
    ref = value_from.get("secretKeyRef")
    if isinstance(ref, dict) and isinstance(ref.get("name"), str) and ref.get("key"):
        if ref.get("optional") is True:
            return _optional(container, var, str(ref["name"]))
        return str(ref["name"]), str(ref["key"])
    what = next(iter(value_from), "valueFrom")
    return (
        f"container {container} takes {var} from {what}, not from a Secret; the node cache "
        "receives credentials only from a Secret (nodePublishSecretRef)"
    )


def _optional(container: str, var: str, secret: str) -> str:
    """Why a credential from an optional Secret reference leaves the pod alone: the app
    starts without the Secret, but a ``nodePublishSecretRef`` to a missing Secret holds the
    pod in ContainerCreating, and without one a private model is refused; the webhook
    cannot tell which case a pod is in."""
    return (
        f"container {container} may take {var} from Secret {secret} (optional: true); the "
        "node cache needs that Secret to exist (nodePublishSecretRef)"
    )


def plan_node_credentials(
    containers: list[Container], models: tuple[NamedModel, ...], fallback: str | None
) -> NodeCredentials | str:
    """The Secret (and key names) the node side gets for these app containers, or the
    reason the pod must be left alone."""
    relevant = _relevant(models)
    # (secret, variable, key, how) for every place a credential may come from
    sources: list[tuple[str, str, str, str]] = []
    for c in containers:
        name = str(c.get("name"))
        explicit = _explicit(c, relevant)
        for var, entry in explicit.items():
            got = _entry_source(name, var, entry)
            if isinstance(got, str):
                return got
            if got is not None:
                sources.append((got[0], var, got[1], var))
        decided = {
            scheme
            for scheme, names in SCHEME_CREDENTIAL_ENV.items()
            if names[0] in explicit and names[0] in relevant
        }
        for src in c.get("envFrom") or []:
            ref = src.get("secretRef") if isinstance(src, dict) else None
            if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
                continue
            prefix = str(src.get("prefix") or "")
            for scheme, names in SCHEME_CREDENTIAL_ENV.items():
                if scheme in decided:
                    continue
                for var in names:
                    if var in relevant and var not in explicit and var.startswith(prefix):
                        if ref.get("optional") is True:
                            return _optional(name, var, str(ref["name"]))
                        sources.append((ref["name"], var, var[len(prefix) :], "envFrom"))
    if not sources:
        return NodeCredentials(fallback)
    secrets = list(dict.fromkeys(s[0] for s in sources))
    if len(secrets) > 1:
        named = "; ".join(
            f"{secret}: {', '.join(dict.fromkeys(s[3] for s in sources if s[0] == secret))}"
            for secret in secrets
        )
        return (
            f"the app's credentials come from {len(secrets)} Secrets ({named}); the node cache "
            "receives one Secret (nodePublishSecretRef)"
        )
    keys: dict[str, str] = {}
    for _secret, var, key, _how in sources:
        if var not in NODE_CREDENTIAL_ENV:
            return (
                f"the app may take {var} from Secret {secrets[0]}, and the node cache cannot "
                f"use {var} yet"
            )
        if keys.setdefault(var, key) != key:
            return (
                f"the app's containers take {var} from two keys of Secret {secrets[0]} "
                f"({keys[var]}, {key}); the node cache receives one"
            )
    return NodeCredentials(secrets[0], tuple((var, key) for var, key in keys.items() if var != key))
