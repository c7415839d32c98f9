"""Cold-start benchmark: time from pod start to "weights loaded", with and without modelcache.

``python -m tests.bench.coldstart`` (``make bench-coldstart``; root, /dev/fuse, nginx).

One run, one generated model (>= 4 GiB, safetensors shards, served by nginx on loopback as a
Hugging Face hub mirror with a per-connection ``limit_rate``), one pod spec
(``examples/vllm.yaml``), every scenario through the local pod runner, several times each:

1. ``baseline``: the example as written; the stand-in for vLLM downloads the model itself,
   one file after another over one connection (what a server does from a hub without
   modelcache), into an emptyDir, then loads it;
2. ``block``: injected (``modelcache.io/warmup: block``), cold node: the warm-up init
   container fetches with parallel ranged reads, then the sidecar mounts, then the app loads;
3. ``async``: injected with ``async``, cold node: the app starts at once and reads through
   the FUSE mount while the sidecar fills the cache;
4. ``warm``: the block pod again on a node whose cache already holds the model.

Time to ready = pod start (before the first init container) until the stand-in answers
``/v1/models``, which it does only after every tensor was read. Ratios are to the baseline
median of the same run. Nothing here is an assertion: it prints numbers and what limits them.

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
from tests.localpod.example import VLLM_EXAMPLE, InjectError, inject_example, mirror_secrets
from tests.localpod.mirror import Mirror, NicLimit, parse_rate, publish_hub_repo
from tests.localpod.runner import (
    REPO_ROOT,
    LocalPod,
    Node,
    PodRun,
    clean_leftovers,
    mountpoints_under,
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


def load_example() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def template_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    for d in docs:
        t = d.get("spec", {}).get("template")
        if t is not None:
            return dict(t)
    raise SystemExit(f"{EXAMPLE}: no pod template")


def inject(mode: str) -> dict[str, Any]:
    try:
        return inject_example(EXAMPLE, {"modelcache.io/warmup": mode})
    except InjectError as exc:
        raise SystemExit(str(exc)) from None


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
        pod, node, name=name, secrets=secrets, ready_timeout=1800, hub_endpoint=endpoint
    )
    with pod_run as lp, Ticker(mirror):
        try:
            run = lp.run()
        finally:  # keep the container logs: cold nodes are deleted after each run
            logs = node.root.parent.parent / "logs" / name
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(lp.dir / "logs", logs)
    sample = _sample(scenario, run, mirror.bytes_sent("/resolve/") - before)
    say(
        f"  {scenario:8} {name}: time to ready {sample.time_to_ready:6.2f}s, "
        f"{sample.model_bytes / 2**30:.2f} GiB fetched (warm-up {_fmt(sample.warmup_s)}, "
        f"sidecar {_fmt(sample.sidecar_s)}, app {sample.app_s:.2f}s, "
        f"load {_fmt(sample.load_s)})"
    )
    return sample


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def fresh_node(root: Path) -> Node:
    if root.exists():
        clean_leftovers(root)  # leftovers of an interrupted run
        if mountpoints_under(root):
            raise SystemExit(f"{root} still has mounts from an interrupted run")
        shutil.rmtree(root)
    return Node(root)


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
        "| model bytes fetched (GiB, median) | warm-up (s) | sidecar start (s) "
        "| app start to ready (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("baseline", "block", "async", "warm"):
        runs = by.get(name, [])
        if not runs:
            continue
        t = [s.time_to_ready for s in runs]
        med = statistics.median(t)

        def med_of(vals: list[float | None]) -> str:
            got = [v for v in vals if v is not None]
            return f"{statistics.median(got):.2f}" if got else "-"

        lines.append(
            f"| {name} | {len(runs)} | {med:.2f} | {min(t):.2f}-{max(t):.2f} | {med / base:.3f}x "
            f"| {statistics.median(s.model_bytes for s in runs) / 2**30:.2f} "
            f"| {med_of([s.warmup_s for s in runs])} | {med_of([s.sidecar_s for s in runs])} "
            f"| {med_of([s.app_s for s in runs])} |"
        )
    return lines


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
    parser.add_argument("--scenarios", default="baseline,block,async,warm")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench" / "coldstart")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        print("coldstart: needs root and /dev/fuse (mount namespaces, FUSE)", file=sys.stderr)
        return 2
    scenarios = args.scenarios.split(",")
    work: Path = args.workdir.resolve()
    block_pod, async_pod = inject("block"), inject("async")
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
    with Mirror(store, limit_rate=args.rate) as mirror, ExitStack() as stack:
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
        for i in range(args.repeats):
            if "baseline" in scenarios:
                node = fresh_node(work / "nodes" / "baseline")
                samples.append(
                    run_pod(
                        "baseline",
                        baseline_pod(endpoint.rstrip("/")),
                        node,
                        f"baseline-{i}",
                        mirror,
                        endpoint=endpoint,
                    )
                )
                shutil.rmtree(node.root)
            if "block" in scenarios:
                node = fresh_node(work / "nodes" / f"block-{i}")
                samples.append(
                    run_pod("block", block_pod, node, f"block-{i}", mirror, endpoint=endpoint)
                )
                if i > 0 or "warm" not in scenarios:
                    shutil.rmtree(node.root)
            if "async" in scenarios:
                node = fresh_node(work / "nodes" / "async")
                samples.append(
                    run_pod("async", async_pod, node, f"async-{i}", mirror, endpoint=endpoint)
                )
                shutil.rmtree(node.root)
        if "warm" in scenarios:
            warm_node = Node(work / "nodes" / "block-0")
            if not warm_node.root.exists():
                warm_node = fresh_node(warm_node.root)
                run_pod("seed", block_pod, warm_node, "seed", mirror, endpoint=endpoint)
            for i in range(args.warm_repeats):
                samples.append(
                    run_pod("warm", block_pod, warm_node, f"warm-{i}", mirror, endpoint=endpoint)
                )
            shutil.rmtree(warm_node.root)
    if "baseline" not in scenarios:
        print("\n".join(f"{s}" for s in samples))
        return 0
    print()
    print("\n".join(report(samples, args, size)))
    (work / "results.json").write_text(json.dumps([s.__dict__ for s in samples], indent=1))
    print(f"\nraw samples: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
