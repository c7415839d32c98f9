"""Admission throughput and latency of ``python -m webhook serve`` over HTTPS on loopback.

    python -m tests.bench.admission [--duration 10] [--concurrency 16] [--compare]

Starts the real server (certs from ``certs.issue``, a client trusting only that CA) and drives
it with concurrent keep-alive HTTPS clients for a bounded time per scenario. Every scenario is
reported as requests/s, p50 and p99 latency, and a ratio against a baseline measured in the
same run against the same server: ``GET /healthz`` (TLS + HTTP + JSON, no admission). The
"loop" scenario posts large pods while one client probes ``/healthz``; its p99 shows whether
admissions block the event loop. ``--compare`` repeats everything for the three ways of
running the pipeline (inline, thread, process) that ``webhook/state.py`` chooses between.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from certs.issue import issue_bundle, write_bundle
from tests.fixtures.webhook_server import make_review, model_pod, start_webhook_process


def _no_model_pod() -> dict[str, Any]:
    pod = model_pod()
    del pod["metadata"]["annotations"]
    pod["spec"]["containers"][0].update(image="nginx", args=["--port", "8000"])
    return pod


def _large_pod(entries: int = 1000) -> dict[str, Any]:
    """A model pod with ~250 KB of managedFields (what a busy controller history looks like)."""
    pod = model_pod()
    pod["metadata"]["managedFields"] = [
        {
            "manager": f"controller-{i}",
            "operation": "Update",
            "apiVersion": "v1",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {f"f:k{j}": {} for j in range(10)}}},
        }
        for i in range(entries)
    ]
    return pod


@dataclass
class Result:
    name: str
    count: int
    seconds: float
    latencies: list[float]
    failures: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _drive(
    session: aiohttp.ClientSession,
    request: Callable[[aiohttp.ClientSession, int], Any],
    *,
    concurrency: int,
    duration: float,
    name: str,
) -> Result:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + duration

    async def worker(w: int) -> None:
        nonlocal failures
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            t0 = time.perf_counter()
            try:
                await request(session, w * 1_000_000 + n)
            except (aiohttp.ClientError, AssertionError, OSError, TimeoutError):
                failures += 1
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Result(name, len(latencies), time.perf_counter() - start, latencies, failures)


def _poster(url: str, pod: dict[str, Any]) -> Callable[[aiohttp.ClientSession, int], Any]:
    async def post(session: aiohttp.ClientSession, n: int) -> None:
        body = json.dumps(make_review(pod, uid=f"bench-{n}"))
        headers = {"Content-Type": "application/json"}
        async with session.post(f"{url}/mutate", data=body, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()

    return post


def _getter(url: str) -> Callable[[aiohttp.ClientSession, int], Any]:
    async def get(session: aiohttp.ClientSession, n: int) -> None:
        async with session.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            await resp.read()

    return get


async def _run_variant(url: str, ca: Path, args: argparse.Namespace) -> list[Result]:
    ctx = ssl.create_default_context(cafile=str(ca))
    connector = aiohttp.TCPConnector(ssl=ctx, limit=args.concurrency + 1)
    timeout = aiohttp.ClientTimeout(total=60)
    results: list[Result] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(3000):  # the port opens before the pipeline warm-up ends
            async with session.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.02)
        # Warm the connections (TLS handshakes) so every scenario measures keep-alive requests.
        await _drive(session, _getter(url), concurrency=args.concurrency, duration=1, name="warm")
        common = {"concurrency": args.concurrency, "duration": args.duration}
        results.append(await _drive(session, _getter(url), name="healthz (baseline)", **common))
        results.append(
            await _drive(session, _poster(url, model_pod()), name="mutate model pod", **common)
        )
        results.append(
            await _drive(
                session, _poster(url, _no_model_pod()), name="mutate no-model pod", **common
            )
        )
        results.append(
            await _drive(
                session,
                _poster(url, model_pod()),
                concurrency=1,
                duration=args.duration,
                name="mutate model pod, 1 client",
            )
        )
        large = _large_pod()
        results.append(
            await _drive(session, _poster(url, large), name="mutate 250KB pod", **common)
        )
        # Event-loop responsiveness: large admissions in flight while /healthz is probed.
        _heavy, probe = await asyncio.gather(
            _drive(session, _poster(url, large), concurrency=4, duration=args.duration, name="x"),
            _drive(
                session,
                _getter(url),
                concurrency=1,
                duration=args.duration,
                name="healthz during 250KB admissions",
            ),
        )
        results.append(probe)
    return results


def _report(variant: str, results: list[Result]) -> None:
    base = results[0]
    print(f"\n## {variant}")
    head = ("scenario", "req/s", "p50 ms", "p99 ms", "rate/base", "p99/base")
    print(f"{head[0]:36} {head[1]:>8} {head[2]:>8} {head[3]:>8} {head[4]:>9} {head[5]:>9} fail")
    for r in results:
        print(
            f"{r.name:36} {r.rate:8.1f} {r.pct(0.50):8.2f} {r.pct(0.99):8.2f}"
            f" {r.rate / base.rate:9.3f} {r.pct(0.99) / base.pct(0.99):9.2f} {r.failures}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive clients")
    parser.add_argument("--compare", action="store_true", help="inline vs thread vs process")
    args = parser.parse_args(argv)

    out = Path(tempfile.mkdtemp(prefix="modelcache-bench-"))
    write_bundle(
        issue_bundle(
            "modelcache-webhook", "modelcache-system", dns=["localhost"], ips=["127.0.0.1"]
        ),
        out,
    )
    variants = {"default (serve as shipped)": []}
    if args.compare:
        variants = {
            "inline: every pod on the event loop": ["--offload-bytes", str(2**40)],
            "thread: every pod in a worker thread": ["--offload-bytes", "0"],
            "process: every pod in a worker process": [
                "--offload-bytes",
                "0",
                "--workers",
                "process",
            ],
            "default (serve as shipped)": [],
        }
    print(
        f"python -m tests.bench.admission --duration {args.duration:g} --concurrency "
        f"{args.concurrency}{' --compare' if args.compare else ''}; Python {sys.version.split()[0]}"
    )
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}")
    failed = 0
    for variant, extra in variants.items():
        wp = start_webhook_process(
            [
                "--tls-cert",
                str(out / "tls.crt"),
                "--tls-key",
                str(out / "tls.key"),
                "--log-level",
                "WARNING",
                *extra,
            ]
        )
        try:
            results = asyncio.run(_run_variant(wp.url, out / "ca.crt", args))
        finally:
            wp.stop()
        _report(variant, results)
        failed += sum(r.failures for r in results)
    print(f"\nfailed requests: {failed}; load average after: {os.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
