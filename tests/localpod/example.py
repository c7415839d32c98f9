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


def mirror_secrets(endpoint: str) -> dict[str, dict[str, str]]:
    """The Secrets a local pod needs to reach the loopback hub mirror at ``endpoint``."""
    return {HF_SECRET: {"HF_ENDPOINT": endpoint.rstrip("/")}}


class InjectError(RuntimeError):
    """The example has no pod template, or the webhook refused it."""


def inject_example(example: Path, annotations: Mapping[str, str]) -> dict[str, Any]:
    """The first workload of ``example``, its pod template annotated with ``annotations``,
    as ``python -m webhook inject`` returns it."""
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
        [sys.executable, "-m", "webhook", "inject", "-f", "-"],
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
