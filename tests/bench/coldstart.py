"""Cold-start benchmark: time from pod start to "weights loaded", with and without modelcache.

``python -m tests.bench.coldstart`` (``make bench-coldstart``; root, /dev/fuse, nginx).

One run, one generated model (>= 4 GiB, safetensors shards, served by nginx on loopback as a
Hugging Face hub mirror with a per-connection ``limit_rate``), one pod spec
(``examples/vllm.yaml``), every scenario through the local pod runner (the kubelet stand-in:
CSI volumes published by the node's real plugin, every container a non-root user), several
times each:

1. ``baseline``: the example as written; the stand-in for vLLM downloads the model itself
   (``snapshot_download``, 8 files at once) into an emptyDir, then loads it;
2. ``block``: injected (``modelcache.io/warmup: block``), cold node: the node plugin fetches
   with parallel ranged reads while the warm-up init container prints its progress, then the
   sidecar serves the FUSE view, then the app loads;
3. ``async``: injected with ``async``, cold node: the app starts at once and reads through
   the FUSE view while the node plugin fills the cache;
4. ``warm``: the block pod again on a node whose cache already holds the model: the
   publish path (NodePublishVolume, the access check with the pod's credentials, the
   descriptor hand-over) and the unprivileged containers;
5. ``warm-hostpath``: the same pod injected with the legacy ``nodeCache: hostPath`` setting
   (privileged sidecar, root warm-up, the cache as a hostPath) on the same warm node,
   interleaved with ``warm``: the difference of the medians is what the publish path adds to
   a warm start (goal: at most 0.5 s).

Time to ready = pod start (the kubelet's volume setup, before the first init container)
until the stand-in answers ``/v1/models``, which it does only after every tensor was read.
Ratios are to the baseline median of the same run. Nothing here is an assertion: it prints
numbers and what limits them.

The bandwidth model: nginx ``limit_rate`` caps each *connection* (a per-stream limit, as S3
or a hub CDN impose per TCP stream); by default there is no node-wide cap, so parallel
ranged reads get ``parallel x rate`` until the machine (2 shared cores, one disk, sha256
verification) becomes the limit. ``--nic-rate`` adds a node NIC cap: every pod reaches the
mirror through a relay that shares one bandwidth budget across all connections (see
docs/bench-coldstart.md for both).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.modelgen import generate_model
from tests.fixtures.nobody import open_to_others
from tests.localpod.example import (
    VLLM_EXAMPLE,
    InjectError,
    inject_example,
    mirror_secrets,
    plugin_env,
)
from tests.localpod.mirror import Mirror, NicLimit, parse_rate, publish_hub_repo
from tests.localpod.runner import (
    REPO_ROOT,
    LocalPod,
    Node,
    PodRun,
    clean_leftovers,
    mountpoints_under,
    uses_csi_driver,
)

EXAMPLE = VLLM_EXAMPLE
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


@dataclass
class Sample:
    scenario: str
    time_to_ready: float
    model_bytes: int
    warmup_s: float | None  # warm-up init container, start to exit
    sidecar_s: float | None  # sidecar start to startupProbe passed
    app_s: float  # app container start to ready
    load_s: float | None  # the stand-in's own "weights loaded in X s"
    volumes_s: float | None = None  # pod start to every volume set up (the publish path)


def load_example() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def template_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    for d in docs:
        t = d.get("spec", {}).get("template")
        if t is not None:
            return dict(t)
    raise SystemExit(f"{EXAMPLE}: no pod template")


def inject(mode: str, config: Path | None = None) -> dict[str, Any]:
    try:
        return inject_example(EXAMPLE, {"modelcache.io/warmup": mode}, config=config)
    except InjectError as exc:
        raise SystemExit(str(exc)) from None


def legacy_config(work: Path) -> Path:
    """The webhook config of the legacy shape (``nodeCache: hostPath``)."""
    path = work / "webhook-hostpath.yaml"
    path.write_text("nodeCache: hostPath\n")
    return path


def baseline_pod(hf_endpoint: str) -> dict[str, Any]:
    """The example as written, plus what a cluster without modelcache gives it: the hub
    endpoint (the mirror) and a scratch emptyDir for the download cache."""
    docs = load_example()
    spec = template_of(docs)["spec"]
    app = spec["containers"][0]
    app.setdefault("env", []).append({"name": "HF_ENDPOINT", "value": hf_endpoint})
    app.setdefault("volumeMounts", []).append(
        {"name": "hf-cache", "mountPath": "/root/.cache/huggingface"}
    )
    spec.setdefault("volumes", []).append({"name": "hf-cache", "emptyDir": {}})
    return next(d for d in docs if "template" in d.get("spec", {}))


def repo_of(injected: dict[str, Any]) -> str:
    status = json.loads(
        injected["spec"]["template"]["metadata"]["annotations"]["modelcache.io/status"]
    )
    uri = str(status["models"][0]["uri"])
    if not uri.startswith("hf://"):
        raise SystemExit(f"the benchmark serves hub models; the example uses {uri}")
    return uri.removeprefix("hf://").split("@", 1)[0]


def _sample(scenario: str, run: PodRun, model_bytes: int) -> Sample:
    def span(name: str, end: str) -> float | None:
        try:
            c = run.container(name)
        except KeyError:
            return None
        stop = c.ended if end == "ended" else c.probed_ok
        return None if stop is None or c.started is None else stop - c.started

    app = next(c for c in run.containers if c.kind == "app")
    assert run.ready_at is not None and app.started is not None and run.time_to_ready is not None
    m = re.search(r"weights loaded in ([0-9.]+) s", app.log.read_text(errors="replace"))
    return Sample(
        scenario=scenario,
        time_to_ready=run.time_to_ready,
        model_bytes=model_bytes,
        warmup_s=span("modelcache-warmup", "ended"),
        sidecar_s=span("modelcache-sidecar", "probed"),
        app_s=run.ready_at - app.started,
        load_s=float(m.group(1)) if m else None,
        volumes_s=None if run.volumes_ready is None else run.volumes_ready - run.t0,
    )


class Ticker:
    """A progress line every few seconds while a pod starts (bytes the mirror has sent)."""

    def __init__(self, mirror: Mirror, every: float = 10.0) -> None:
        self.mirror, self.every = mirror, every
        self.stop = threading.Event()
        self.start_bytes = mirror.bytes_sent("/resolve/")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            done = self.mirror.bytes_sent("/resolve/") - self.start_bytes
            say(f"    ... {done / 2**20:.0f} MiB of completed files sent by the mirror")

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def run_pod(
    scenario: str, pod: dict[str, Any], node: Node, name: str, mirror: Mirror, *, endpoint: str
) -> Sample:
    secrets = mirror_secrets(endpoint)
    before = mirror.bytes_sent("/resolve/")
    pod_run = LocalPod(
        pod,
        node,
        name=name,
        secrets=secrets,
        ready_timeout=1800,
        hub_endpoint=endpoint,
        allow_root=not uses_csi_driver(pod),  # only the legacy hostPath shape asks for root
    )
    with pod_run as lp, Ticker(mirror):
        try:
            run = lp.run()
        finally:  # keep the container logs: cold nodes are deleted after each run
            logs = node.root.parent.parent / "logs" / name
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(lp.log_dir, logs)
    sample = _sample(scenario, run, mirror.bytes_sent("/resolve/") - before)
    say(
        f"  {scenario:8} {name}: time to ready {sample.time_to_ready:6.2f}s, "
        f"{sample.model_bytes / 2**30:.2f} GiB fetched (warm-up {_fmt(sample.warmup_s)}, "
        f"sidecar {_fmt(sample.sidecar_s)}, app {sample.app_s:.2f}s, "
        f"load {_fmt(sample.load_s)}, volumes {_fmt(sample.volumes_s)})"
    )
    return sample


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def fresh_node(root: Path, endpoint: str | None = None) -> Node:
    """An empty node; with ``endpoint``, its CSI plugin runs with that hub."""
    if root.exists():
        clean_leftovers(root)  # leftovers of an interrupted run
        if mountpoints_under(root):
            raise SystemExit(f"{root} still has mounts from an interrupted run")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    node = Node(root)
    if endpoint is not None:
        node.start_csi_plugin(env=plugin_env(endpoint))
    return node


def drop_node(node: Node) -> None:
    """Stop the node's plugin and delete it (its pods are gone, and with them its mounts)."""
    node.stop_csi_plugin()
    if mountpoints_under(node.root):
        raise SystemExit(f"{node.root} still has mounts after its pods stopped")
    shutil.rmtree(node.root)


SCENARIOS = ("baseline", "block", "async", "warm", "warm-hostpath")


def report(samples: list[Sample], args: argparse.Namespace, size: int) -> list[str]:
    by: dict[str, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.scenario, []).append(s)
    base = statistics.median(s.time_to_ready for s in by["baseline"])
    nic = f", node NIC cap {args.nic_rate}" if args.nic_rate else ", no node NIC cap"
    lines = [
        f"model {size / 2**30:.2f} GiB, limit_rate {args.rate} per connection{nic}, "
        f"{os.cpu_count()} CPUs",
        "",
        "| scenario | runs | time to ready (median, s) | min-max (s) | ratio to baseline "
        "| model bytes fetched (GiB, median) | volumes set up (s) | warm-up (s) "
        "| sidecar start (s) | pod start to app start (s) | app start to ready (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def med_of(vals: list[float | None]) -> str:
        got = [v for v in vals if v is not None]
        return f"{statistics.median(got):.2f}" if got else "-"

    for name in SCENARIOS:
        runs = by.get(name, [])
        if not runs:
            continue
        t = [s.time_to_ready for s in runs]
        med = statistics.median(t)
        lines.append(
            f"| {name} | {len(runs)} | {med:.2f} | {min(t):.2f}-{max(t):.2f} | {med / base:.3f}x "
            f"| {statistics.median(s.model_bytes for s in runs) / 2**30:.2f} "
            f"| {med_of([s.volumes_s for s in runs])} "
            f"| {med_of([s.warmup_s for s in runs])} | {med_of([s.sidecar_s for s in runs])} "
            f"| {med_of([s.time_to_ready - s.app_s for s in runs])} "
            f"| {med_of([s.app_s for s in runs])} |"
        )
    lines += ["", *publish_path_cost(by)]
    return lines


def publish_path_cost(by: dict[str, list[Sample]]) -> list[str]:
    """What the CSI publish path adds to a warm start: ``warm`` against ``warm-hostpath``,
    run interleaved on the same warm node."""
    csi, legacy = by.get("warm", []), by.get("warm-hostpath", [])
    if not csi or not legacy:
        return []
    added = statistics.median(s.time_to_ready for s in csi) - statistics.median(
        s.time_to_ready for s in legacy
    )
    pairs = [a.time_to_ready - b.time_to_ready for a, b in zip(csi, legacy, strict=False)]
    verdict = "met" if added <= 0.5 else "NOT met"

    def before_app(runs: list[Sample]) -> float:
        return statistics.median(s.time_to_ready - s.app_s for s in runs)

    # what the publish path can change ends when the app starts; the app's own load
    # (seconds of reading 4 GiB) is the same work in both shapes and carries the noise
    early = before_app(csi) - before_app(legacy)
    return [
        f"publish path on a warm start: {added:+.2f} s (median warm - median warm-hostpath; "
        f"interleaved pairs: {', '.join(f'{d:+.2f}' for d in pairs)}); goal <= 0.5 s: {verdict}",
        f"pod start to app start: {before_app(csi):.2f} s (csi) vs {before_app(legacy):.2f} s "
        f"(hostPath): {early:+.2f} s",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.coldstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rate", default="32m", help="nginx limit_rate per connection")
    parser.add_argument(
        "--nic-rate",
        default="",
        help="also cap the sum of all connections (a node NIC), e.g. 64m; default: no cap",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each cold scenario")
    parser.add_argument("--warm-repeats", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench" / "coldstart")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        print("coldstart: needs root and /dev/fuse (mount namespaces, FUSE)", file=sys.stderr)
        return 2
    scenarios = args.scenarios.split(",")
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        print(f"coldstart: unknown scenarios {unknown}; known: {SCENARIOS}", file=sys.stderr)
        return 2
    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    block_pod, async_pod = inject("block"), inject("async")
    legacy_pod = inject("block", legacy_config(work)) if "warm-hostpath" in scenarios else None
    repo = repo_of(block_pod)
    model_dir = work / "models" / repo.replace("/", "--")
    say(f"model {repo}: generating {args.size_gib} GiB in {args.shards} shards (reused if present)")
    model = generate_model(
        model_dir, total_bytes=int(args.size_gib * 2**30), shards=args.shards, reuse=True
    )
    size = model.total_bytes
    store = work / "store"
    say("publishing it on the hub mirror (model info with the sha256 of every shard)")
    publish_hub_repo(store, repo, model)
    samples: list[Sample] = []
    nodes = work / "nodes"
    nodes.mkdir(exist_ok=True)
    for d in (work, nodes):
        d.chmod(0o755)  # the pods' non-root users reach the runner's files under it
    with (
        Mirror(store, limit_rate=args.rate) as mirror,
        ExitStack() as stack,
        open_to_others(REPO_ROOT, Path(sys.prefix), nodes),
    ):
        say(f"mirror {mirror.url}, limit_rate {args.rate} per connection")
        endpoint = mirror.url
        if args.nic_rate:
            nic = stack.enter_context(NicLimit(mirror.port, parse_rate(args.nic_rate)))
            endpoint = nic.url
            say(f"node NIC cap {args.nic_rate}: every pod reaches the mirror through {endpoint}")
        # the mirror reads its files once so every scenario finds them in its page cache
        for p in sorted(model_dir.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:
                    while f.read(16 << 20):
                        pass
        warm_wanted = "warm" in scenarios or "warm-hostpath" in scenarios
        warm_node: Node | None = None
        try:
            for i in range(args.repeats):
                if "baseline" in scenarios:
                    node = fresh_node(nodes / "baseline")
                    base_pod = baseline_pod(endpoint.rstrip("/"))
                    samples.append(
                        run_pod(
                            "baseline", base_pod, node, f"baseline-{i}", mirror, endpoint=endpoint
                        )
                    )
                    drop_node(node)
                if "block" in scenarios:
                    node = fresh_node(nodes / f"block-{i}", endpoint)
                    samples.append(
                        run_pod("block", block_pod, node, f"block-{i}", mirror, endpoint=endpoint)
                    )
                    if warm_node is None and warm_wanted:
                        warm_node = node  # its cache holds the model now
                    else:
                        drop_node(node)
                if "async" in scenarios:
                    node = fresh_node(nodes / "async", endpoint)
                    samples.append(
                        run_pod("async", async_pod, node, f"async-{i}", mirror, endpoint=endpoint)
                    )
                    drop_node(node)
            if warm_wanted:
                if warm_node is None:
                    warm_node = fresh_node(nodes / "warm", endpoint)
                    run_pod("seed", block_pod, warm_node, "seed", mirror, endpoint=endpoint)
                for i in range(args.warm_repeats):  # interleaved: drift hits both alike
                    if "warm" in scenarios:
                        samples.append(
                            run_pod(
                                "warm", block_pod, warm_node, f"warm-{i}", mirror, endpoint=endpoint
                            )
                        )
                    if legacy_pod is not None:
                        samples.append(
                            run_pod(
                                "warm-hostpath",
                                legacy_pod,
                                warm_node,
                                f"warm-hostpath-{i}",
                                mirror,
                                endpoint=endpoint,
                            )
                        )
        finally:
            if warm_node is not None:
                drop_node(warm_node)
    if "baseline" not in scenarios:
        print("\n".join(f"{s}" for s in samples))
        print(
            "\n".join(
                publish_path_cost({n: [s for s in samples if s.scenario == n] for n in SCENARIOS})
            )
        )
        return 0
    print()
    print("\n".join(report(samples, args, size)))
    (work / "results.json").write_text(json.dumps([s.__dict__ for s in samples], indent=1))
    print(f"\nraw samples: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
