"""An example manifest with chosen annotations, injected by the real offline CLI.

The local-pod tests and the cold-start benchmark both start from an example under
``examples/`` with a few ``modelcache.io/*`` annotations set, as a user would write them, and
need what ``python -m webhook inject`` makes of it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.localpod.runner import REPO_ROOT
from webhook.config import Config

#: The unmodified vLLM Deployment the demo, the benchmark and the tests start from.
VLLM_EXAMPLE = REPO_ROOT / "examples" / "vllm.yaml"
#: The Secret the webhook's default config takes hub credentials (``HF_ENDPOINT``) from.
HF_SECRET: str = Config().credentials.hf.secret_name or "modelcache-hf-credentials"


#: The Secret the example's app takes its hub token from (``secretKeyRef``).
APP_TOKEN_SECRET = "hf-token"


def mirror_secrets(endpoint: str) -> dict[str, dict[str, str]]:
    """The Secrets of the pod's namespace for the loopback hub mirror at ``endpoint``: the
    cluster's ``HF_ENDPOINT`` for modelcache's containers (legacy ``nodeCache: hostPath``
    output) and the app's own token Secret, which a ``csi`` volume's
    ``nodePublishSecretRef`` names (the kubelet fails the mount when it is missing; the
    mirror takes any token)."""
    return {
        HF_SECRET: {"HF_ENDPOINT": endpoint.rstrip("/")},
        APP_TOKEN_SECRET: {"token": "hf_localpod_user_token"},
    }


def plugin_env(endpoint: str) -> dict[str, str]:
    """The node plugin's own configuration for the mirror: where the hub is."""
    return {"HF_ENDPOINT": endpoint.rstrip("/")}


class InjectError(RuntimeError):
    """The example has no pod template, or the webhook refused it."""


def inject_example(
    example: Path, annotations: Mapping[str, str], *, config: Path | None = None
) -> dict[str, Any]:
    """The first workload of ``example``, its pod template annotated with ``annotations``,
    as ``python -m webhook inject`` (with the webhook ``config`` file, if given) returns it."""
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d]
    templates = [
        d["spec"]["template"]
        for d in docs
        if isinstance((d.get("spec") or {}).get("template"), dict)
    ]
    if not templates:
        raise InjectError(f"{example}: no workload with a pod template")
    for template in templates:
        template.setdefault("metadata", {}).setdefault("annotations", {}).update(annotations)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "webhook",
            "inject",
            "-f",
            "-",
            *(["--config", str(config)] if config else []),
        ],
        input=yaml.safe_dump_all(docs),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    if proc.returncode:
        raise InjectError(f"python -m webhook inject failed: {proc.stderr.strip()}")
    for doc in yaml.safe_load_all(proc.stdout):
        if doc and "template" in (doc.get("spec") or {}):
            return dict(doc)
    raise InjectError(f"python -m webhook inject returned no workload for {example}")
