"""``make run``: an unmodified vLLM Deployment, injected and started on a cold, then a warm node.

No cluster and no network: a small but real model is generated under ``.demo/`` and served by
nginx on loopback as an enterprise Hugging Face mirror (the documented hub endpoints as
static files). ``examples/vllm.yaml`` is injected by the real ``python -m webhook inject``,
untouched: the webhook detects the hub model in ``vllm serve ORG/NAME`` and chooses hub-cache
delivery, so the app's command line stays as written. The node runs the real CSI node plugin
(``python -m sidecar csi``), configured with the mirror as its hub (``HF_ENDPOINT``), the
only process that fetches and the only writer of the node cache; on this loopback-only node
the mirror also stands for the Hub the app reaches by default (the runner's
``hub_endpoint``). The pod then runs with the local pod runner (``tests/localpod/runner.py``)
as the kubelet runs it: NodePublishVolume for its ``csi.modelcache.io`` volumes (the
read-only view and the FUSE mount, with the data of the app's token Secret ``hf-token``,
which the mirror accepts whatever it holds), then the unprivileged warm-up init container,
which prints the node's fetch progress, the unprivileged FUSE sidecar, which serves the
descriptor the plugin handed over and lays the model out in the Hugging Face cache layout of
the pod's ``modelcache-hub`` volume, and a stand-in for the vLLM process that loads the
model the way vLLM does, with ``huggingface_hub.snapshot_download(ORG/NAME)`` and the pod's
env, reads every tensor and answers ``/v1/models``. Every container runs as a non-root user
without capabilities. The mirror's byte counters show the app fetched no model byte. (With
the webhook's legacy ``nodeCache: hostPath`` output, the demo runs that shape instead: a
privileged sidecar and a root warm-up that fetches, the only containers allowed root.)

Needs root (mount namespaces, FUSE). Prints progress lines, the pod diff, and the summary
lines ``cold node: time to ready <seconds>`` and ``warm node: time to ready <seconds>``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.modelgen import generate_model
from tests.fixtures.nobody import open_to_others
from tests.localpod.example import VLLM_EXAMPLE, mirror_secrets, plugin_env
from tests.localpod.mirror import Mirror, MirrorError, publish_hub_repo
from tests.localpod.runner import (
    REPO_ROOT,
    LocalPod,
    Node,
    PodFailed,
    PodRun,
    RunnerError,
    clean_leftovers,
    mountpoints_under,
    pod_from_manifest,
    uses_csi_driver,
)

EXAMPLE = VLLM_EXAMPLE
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class DemoError(RuntimeError):
    """The demo cannot run here; the message says why and what to do."""


def inject(manifest: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(original pod, injected pod, webhook warnings) through the real offline CLI."""
    proc = subprocess.run(
        [sys.executable, "-m", "webhook", "inject", "-f", str(manifest)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise DemoError(f"python -m webhook inject failed: {proc.stderr.strip()}")
    before = pod_from_manifest(list(yaml.safe_load_all(manifest.read_text())))
    after = pod_from_manifest(list(yaml.safe_load_all(proc.stdout)))
    return before, after, [w for w in proc.stderr.splitlines() if w.strip()]


def hub_repo_of(pod: dict[str, Any]) -> str:
    status = json.loads(
        (pod["metadata"].get("annotations") or {}).get("modelcache.io/status", "{}")
    )
    models = status.get("models") or []
    if not models:
        raise DemoError("the webhook injected no model into the example")
    uri = str(models[0]["uri"])
    if not uri.startswith("hf://"):
        raise DemoError(f"the demo serves hub models from its mirror; the example uses {uri}")
    return uri.removeprefix("hf://").split("@", 1)[0]


def pod_diff(before: dict[str, Any], after: dict[str, Any], limit: int = 90) -> list[str]:
    def dump(pod: dict[str, Any]) -> list[str]:
        pod = json.loads(json.dumps(pod))
        ann = pod.get("metadata", {}).get("annotations") or {}
        if "modelcache.io/status" in ann:  # one long JSON line: shown in full by inject
            ann["modelcache.io/status"] = f"<JSON, {len(ann['modelcache.io/status'])} chars>"
        return yaml.safe_dump(pod, sort_keys=False, width=100, default_flow_style=None).splitlines()

    diff = list(
        difflib.unified_diff(
            dump(before),
            dump(after),
            "pod template (as written)",
            "pod template (injected)",
            lineterm="",
            n=1,
        )
    )
    if len(diff) > limit:
        diff = [*diff[:limit], f"... ({len(diff) - limit} more diff lines)"]
    return diff


class LogFollower:
    """Prints the warm-up's progress lines (its stderr, as ``kubectl logs`` would show)."""

    def __init__(self, log_dir: Path, names: tuple[str, ...]) -> None:
        self.files = [log_dir / f"{n}.log" for n in names]
        self.offsets = dict.fromkeys(self.files, 0)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(1.0):
            self.poll()

    def poll(self) -> None:
        for f in self.files:
            try:
                with open(f, "rb") as fh:
                    fh.seek(self.offsets[f])
                    data = fh.read()
            except OSError:
                continue
            self.offsets[f] += len(data)
            for line in data.decode(errors="replace").splitlines():
                if "warmup" in line or "progress" in line.lower() or "%" in line:
                    say(f"  {f.stem}: {line.strip()[-140:]}")

    def __enter__(self) -> LogFollower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()
        self.poll()


def run_pod(pod: dict[str, Any], node: Node, name: str, mirror: Mirror) -> tuple[PodRun, int, int]:
    """Run one pod to ready, then stop it; (run, model bytes fetched, all bytes fetched)."""
    model0, all0 = mirror.bytes_sent("/resolve/"), mirror.bytes_sent()
    secrets = mirror_secrets(mirror.url)
    lp = LocalPod(
        pod,
        node,
        name=name,
        secrets=secrets,
        progress=say,
        ready_timeout=300,
        hub_endpoint=mirror.url,
        allow_root=not uses_csi_driver(pod),  # the legacy hostPath shape needs root
    )
    with lp, LogFollower(lp.log_dir, ("modelcache-warmup", "modelcache-sidecar")):
        try:
            run = lp.run()
        except PodFailed as exc:
            for line in lp.run_info.report_lines():
                print(line)
            raise DemoError(f"pod {name} failed: {exc}") from exc
        for line in run.report_lines():
            print(line)
        users = ", ".join(f"{n} {i.uid}" for n, i in lp.identities.items())
        say(f"{name}: containers ran as uids: {users}")
        for c in run.containers:
            if c.kind == "app":
                for line in c.log.read_text(errors="replace").splitlines():
                    if line.startswith("standin: "):
                        say(f"  {c.name}: {line.removeprefix('standin: ')}")
        say(f"{name}: GET /v1/models answers {run.served_models}")
    return run, mirror.bytes_sent("/resolve/") - model0, mirror.bytes_sent() - all0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.localpod.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".demo")
    parser.add_argument("--model-mib", type=int, default=256, help="size of the generated model")
    parser.add_argument("--example", type=Path, default=EXAMPLE)
    parser.add_argument(
        "--rate",
        default="16m",
        help="nginx limit_rate per connection, like a mirror's per-stream limit ('' = none)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleanup as on Ctrl-C
    if os.geteuid() != 0:
        print(
            "demo: needs root: each container runs in its own mount namespace and the sidecar "
            "makes a FUSE mount (run `sudo make run`, or in a root container)",
            file=sys.stderr,
        )
        return 2
    if not Path("/dev/fuse").exists():
        print("demo: /dev/fuse is missing: the cache sidecar cannot mount", file=sys.stderr)
        return 2
    try:
        return _demo(args)
    except (DemoError, RunnerError, MirrorError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; every container was stopped and unmounted", file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace) -> int:
    work: Path = args.workdir.resolve()
    say(f"injecting {args.example} with `python -m webhook inject`")
    before, after, warnings = inject(args.example)
    for w in warnings:
        say(f"  webhook: {w}")
    repo = hub_repo_of(after)
    print("\n".join(pod_diff(before, after)))

    store = work / "store"
    model_dir = work / "models" / repo.replace("/", "--")
    say(f"generating a {args.model_mib} MiB model (safetensors shards, config, tokenizer)")
    model = generate_model(model_dir, total_bytes=args.model_mib << 20, shards=4, reuse=True)
    size = model.total_bytes
    publish_hub_repo(store, repo, model)
    say(f"model {repo}: {size / 2**20:.0f} MiB in {len(list(model_dir.iterdir()))} files")

    node = Node(work / "node")
    if node.root.exists():
        for what in clean_leftovers(node.root):
            say(f"cleaned up {what}, left over from an interrupted run")
        if mountpoints_under(node.root):
            raise DemoError(f"{node.root} still has mounts from an interrupted run")
        shutil.rmtree(node.root)
    csi = uses_csi_driver(after)
    node.root.mkdir(parents=True)
    node.root.chmod(0o755)  # the pod's non-root users reach the runner's files under it
    with (
        Mirror(store, limit_rate=args.rate or None) as mirror,
        node,
        open_to_others(REPO_ROOT, Path(sys.prefix), node.root),
    ):
        say(f"hub mirror (nginx, limit_rate {args.rate or 'none'} per connection) at {mirror.url}")
        if csi:
            node.start_csi_plugin(env=plugin_env(mirror.url))
            say(
                f"node plugin csi.modelcache.io started (HF_ENDPOINT={mirror.url.rstrip('/')}; "
                f"log: {node.root / 'logs' / 'csi-plugin.log'})"
            )
        say("cold node: starting the injected pod")
        cold, cold_model, cold_all = run_pod(after, node, "vllm-cold", mirror)
        say("warm node: starting a second pod on the same node")
        warm, warm_model, warm_all = run_pod(after, node, "vllm-warm", mirror)
    print()
    print(
        f"model: {repo} ({size / 2**20:.0f} MiB), source: loopback hub mirror "
        f"(nginx, limit_rate {args.rate or 'none'} per connection)"
    )
    print(f"cold node: time to ready {cold.time_to_ready:.2f}")
    print(f"cold node: bytes fetched {cold_model} model bytes ({cold_all} with listings)")
    print(f"warm node: time to ready {warm.time_to_ready:.2f}")
    print(f"warm node: bytes fetched {warm_model} model bytes ({warm_all} with listings)")
    print(f"both pods answered /v1/models with {warm.served_models}; logs under {node.root}/logs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
