"""Warm-up throughput: ``python -m sidecar warmup`` vs ``aria2c -x16 -s16`` vs ``curl``.

    python -m tests.bench.warmup [--size-gib 2] [--shards 4] [--rounds 3] [--parallel 8]

One nginx on loopback serves one generated model (in ``.bench/``, reused between runs); every
tool downloads all of its files into a fresh directory on the same disk, ``--rounds`` times,
the tools interleaved round by round so they share whatever else the machine is doing. The
target directory is deleted between runs; the page cache is *not* dropped (the machine is
shared), so nginx reads the source from memory and the numbers are network-stack + client +
write-path numbers. Ours includes what it always does: size checks, fdatasync of every part,
fsync before rename, the manifest. Prints MB/s per run, the median, and ratios against aria2c.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures.modelgen import generate_model
from tests.fixtures.servers import nginx_server

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / ".bench" / "warmup"


def _model(size_gib: float, shards: int) -> tuple[Path, list[tuple[str, int]]]:
    src = BENCH / "src"
    marker = BENCH / "model.json"
    want = {"size_gib": size_gib, "shards": shards, "seed": 7}
    if not marker.exists() or json.loads(marker.read_text()).get("params") != want:
        shutil.rmtree(src, ignore_errors=True)
        t = time.monotonic()
        info = generate_model(
            src / "bench-model", total_bytes=int(size_gib * (1 << 30)), shards=shards, seed=7
        )
        files = [(f.path, f.size) for f in info.files.values()]
        marker.write_text(json.dumps({"params": want, "files": files}))
        print(f"generated {info.total_bytes / 1e9:.2f} GB in {time.monotonic() - t:.1f}s")
    files = [tuple(x) for x in json.loads(marker.read_text())["files"]]
    return src, files  # type: ignore[return-value]


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.monotonic()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({res.returncode}): {res.stderr[-2000:]}")
    return elapsed


def _fsync_all(target: Path, files: list[tuple[str, int]]) -> float:
    """Make another tool's download as durable as ours (we fsync before the rename)."""
    t = time.monotonic()
    for path, _ in files:
        fd = os.open(target / path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - t


def _check(target: Path, files: list[tuple[str, int]]) -> None:
    for path, size in files:
        got = (target / path).stat().st_size
        if got != size:
            raise SystemExit(f"{target / path}: {got} bytes, expected {size}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=8)
    args = ap.parse_args()
    for tool in ("aria2c", "curl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (make system-deps)")
    src, files = _model(args.size_gib, args.shards)
    total = sum(size for _, size in files)
    target = BENCH / "target"
    results: dict[str, list[float]] = {"ours": [], "aria2c": [], "curl": []}
    durable: dict[str, list[float]] = {"aria2c+fsync": [], "curl+fsync": []}
    with nginx_server(src) as server:
        base = f"{server}bench-model/"
        model_arg = f"bench={base}"
        aria_input = BENCH / "aria2-input.txt"
        aria_input.write_text("".join(f"{base}{path}\n  out={path}\n" for path, _ in files))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for rnd in range(args.rounds):
            for tool in list(results):
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                if tool == "ours":
                    secs = _timed(
                        [
                            sys.executable,
                            "-m",
                            "sidecar",
                            "warmup",
                            "--cache-dir",
                            str(target),
                            "--model",
                            model_arg,
                            "--parallel",
                            str(args.parallel),
                        ],
                        env,
                    )
                    key = next((target / "models").iterdir())
                    _check(key / "data", files)
                elif tool == "aria2c":
                    secs = _timed(
                        [
                            "aria2c",
                            "-x16",
                            "-s16",
                            "-j",
                            "4",
                            "-q",
                            "--file-allocation=none",
                            "--allow-overwrite=true",
                            "-d",
                            str(target),
                            "-i",
                            str(aria_input),
                        ]
                    )
                    _check(target, files)
                else:
                    cmd = ["curl", "-s", "-f"]
                    for path, _ in files:
                        cmd += ["-o", str(target / path), f"{base}{path}"]
                    secs = _timed(cmd)
                    _check(target, files)
                results[tool].append(total / secs / 1e6)
                line = f"round {rnd + 1} {tool:7s} {total / secs / 1e6:8.1f} MB/s ({secs:.2f}s)"
                if tool != "ours":
                    synced = secs + _fsync_all(target, files)
                    durable[f"{tool}+fsync"].append(total / synced / 1e6)
                    line += f", with fsync {total / synced / 1e6:.1f} MB/s ({synced:.2f}s)"
                print(line)
        shutil.rmtree(target, ignore_errors=True)
    results.update(durable)
    med = {tool: statistics.median(v) for tool, v in results.items()}
    print(
        f"\nmodel: {total / 1e9:.2f} GB in {len(files)} files ({args.shards} shards), "
        f"{args.rounds} rounds, --parallel {args.parallel}, nginx on loopback"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| tool | median MB/s | runs MB/s | vs aria2c |")
    print("|---|---|---|---|")
    for tool, v in results.items():
        runs = ", ".join(f"{x:.0f}" for x in v)
        print(f"| {tool} | {med[tool]:.0f} | {runs} | {med[tool] / med['aria2c']:.2f}x |")


if __name__ == "__main__":
    main()
