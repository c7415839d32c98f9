"""Admission throughput and latency of ``python -m webhook serve`` over HTTPS on loopback.

    python -m tests.bench.admission [--duration 10] [--concurrency 16] [--compare]
                                    [--slow 1000] [--rate 200] [--skip-hostile]

Starts the real server (certs from ``certs.issue``, a client trusting only that CA) and drives
it with concurrent keep-alive HTTPS clients for a bounded time per scenario. Every scenario is
reported as requests/s, p50 and p99 latency, and a ratio against a baseline measured in the
same run against the same server: ``GET /healthz`` (TLS + HTTP + JSON, no admission). The
"loop" scenario posts large pods while one client probes ``/healthz``; its p99 shows whether
admissions block the event loop. ``--compare`` repeats everything for the three ways of
running the pipeline (inline, thread, process) that ``webhook/state.py`` chooses between.

The hostile-load section (docs/bench-admission.md) then runs against the server as shipped:
a 6,000-container pod, a typical model pod at a steady ``--rate`` admissions/s (open loop:
requests start on schedule whether or not earlier ones are done), and normal admissions while
``--slow`` connections trickle headers or bodies from a separate process (each reconnects as
soon as the server cuts it off, so about that many stay open), with the server's memory
(PSS of the server and its workers) before, at peak and after the slow clients leave.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


def _wide_pod(containers: int = 6000) -> dict[str, Any]:
    """A model pod of many small app containers, each serving the annotated model (~790 KB
    as a review at 6,000)."""
    pod = model_pod()
    template = pod["spec"]["containers"][0]
    pod["spec"]["containers"] = [
        {**template, "name": f"c{i}", "args": ["--model", "org/model", "--port", str(8000 + i)]}
        for i in range(containers)
    ]
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
    first_error: str = ""

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
    first_error = ""
    deadline = time.perf_counter() + duration

    async def worker(w: int) -> None:
        nonlocal failures, first_error
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            t0 = time.perf_counter()
            try:
                await request(session, w * 1_000_000 + n)
            except (aiohttp.ClientError, AssertionError, OSError, TimeoutError) as e:
                failures += 1
                first_error = first_error or f"{type(e).__name__}: {e}"[:200]
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Result(
        name, len(latencies), time.perf_counter() - start, latencies, failures, first_error
    )


def _poster(url: str, pod: dict[str, Any]) -> Callable[[aiohttp.ClientSession, int], Any]:
    async def post(session: aiohttp.ClientSession, n: int) -> None:
        body = json.dumps(make_review(pod, uid=f"bench-{n}"))
        headers = {"Content-Type": "application/json"}
        async with session.post(f"{url}/mutate", data=body, headers=headers) as resp:
            text = await resp.read()
            assert resp.status == 200, f"HTTP {resp.status} {text[:200]!r}"

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


# --- hostile load ---------------------------------------------------------------------------


def _pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` and all its descendants (the admission workers)."""
    total = 0
    pending = [pid]
    for _ in range(64):  # a shallow tree: server, its workers
        if not pending:
            break
        current, pending = pending, []
        for p in current:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                for task in Path(f"/proc/{p}/task").iterdir():
                    children = (task / "children").read_text().split()
                    pending.extend(int(c) for c in children)
    return total


async def _gauge(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _steady(
    session: aiohttp.ClientSession, url: str, pod: dict[str, Any], rate: float, duration: float
) -> Result:
    """Open loop: request i starts at ``i / rate`` s, latency from its start to its answer."""
    post = _poster(url, pod)
    latencies: list[float] = []
    failures = 0

    async def one(n: int) -> None:
        nonlocal failures
        t0 = time.perf_counter()
        try:
            await post(session, n)
        except (aiohttp.ClientError, AssertionError, OSError, TimeoutError):
            failures += 1
            return
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    tasks = []
    for n in range(int(rate * duration)):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    return Result(
        f"model pod at {rate:g}/s (open loop)",
        len(latencies),
        time.perf_counter() - start,
        latencies,
        failures,
    )


async def _slow_clients(host: str, port: int, ca: str, count: int, duration: float) -> None:
    """``count`` connections that send a request a byte at a time; each reconnects when the
    server closes it, until ``duration`` is over."""
    ctx = ssl.create_default_context(cafile=ca)
    body = json.dumps(make_review(model_pod())).encode()
    head = (
        "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + duration
    cut = 0

    async def client(i: int) -> None:
        nonlocal cut
        # half trickle the headers, half send them and trickle the body
        first, trickle = (b"", head) if i % 2 else (head, body)
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost"),
                    10,
                )
            except (OSError, TimeoutError):
                await asyncio.sleep(0.2)
                continue
            try:
                writer.write(first)
                for byte in trickle:
                    if time.monotonic() > deadline or reader.at_eof() or writer.is_closing():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.5)
                    if reader.at_eof():
                        break
                cut += 1
            except (OSError, ssl.SSLError):
                cut += 1
            finally:
                writer.transport.abort()

    await asyncio.gather(*(client(i) for i in range(count)))
    print(f"slow clients: {count}, connections cut by the server: {cut}", file=sys.stderr)


async def _hostile(url: str, ca: Path, pid: int, args: argparse.Namespace) -> list[Result]:
    ctx = ssl.create_default_context(cafile=str(ca))
    connector = aiohttp.TCPConnector(ssl=ctx, limit=args.concurrency + 1)
    results: list[Result] = []
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        results.append(
            await _drive(
                session,
                _getter(url),
                concurrency=args.concurrency,
                duration=3,
                name="healthz (baseline)",
            )
        )
        wide = await _drive(session, _poster(url, _wide_pod()), concurrency=1, duration=1, name="x")
        wide.name = "6,000-container pod, 1 client"
        results.append(wide)
        results.append(
            await _drive(
                session,
                _poster(url, _large_pod()),
                concurrency=1,
                duration=args.duration,
                name="250KB managedFields pod, 1 client",
            )
        )
        results.append(await _steady(session, url, model_pod(), args.rate, args.duration))

        host, port = url.removeprefix("https://").rsplit(":", 1)
        before = _pss_kb(pid)
        slow = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bench.admission",
            "--slow-client-process",
            f"{host}:{port}",
            "--ca",
            str(ca),
            "--slow",
            str(args.slow),
            "--duration",
            str(args.duration + 15),
        )
        try:
            opened = 0.0
            for _ in range(300):  # until (nearly) all slow connections are open, bounded
                opened = await _gauge(session, url, "modelcache_webhook_open_connections")
                if opened >= args.slow * 0.9:
                    break
                await asyncio.sleep(0.1)
            peak = [_pss_kb(pid), int(opened)]

            async def watch() -> None:
                while True:
                    peak[0] = max(peak[0], _pss_kb(pid))
                    peak[1] = max(
                        peak[1],
                        int(await _gauge(session, url, "modelcache_webhook_open_connections")),
                    )
                    await asyncio.sleep(0.25)

            watcher = asyncio.create_task(watch())
            # one client at a time, as the API server sends a pod's review: the latency a
            # pod creation sees, not queueing behind our own concurrent requests
            during = await _drive(
                session,
                _poster(url, model_pod()),
                concurrency=1,
                duration=args.duration,
                name=f"model pod, 1 client, {args.slow} slow conns",
            )
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        finally:
            slow.terminate()
            await asyncio.wait_for(slow.wait(), 30)
        for _ in range(200):  # until the server has let go of them, bounded
            if await _gauge(session, url, "modelcache_webhook_open_connections") <= 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # let freed memory be returned
        after = _pss_kb(pid)
        results.append(during)
        print(
            f"\nslow connections: up to {peak[1]} open at once; server PSS (with workers) "
            f"before {before / 1024:.0f} MB, peak {peak[0] / 1024:.0f} MB, "
            f"after they left {after / 1024:.0f} MB"
        )
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
        if r.first_error:
            print(f"  first failure: {r.first_error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive clients")
    parser.add_argument("--compare", action="store_true", help="inline vs thread vs process")
    parser.add_argument("--slow", type=int, default=1000, help="slow connections to hold open")
    parser.add_argument("--rate", type=float, default=200.0, help="steady admissions/s")
    parser.add_argument("--skip-hostile", action="store_true", help="only the throughput table")
    parser.add_argument(
        "--skip-throughput", action="store_true", help="only the hostile-load table"
    )
    parser.add_argument("--slow-client-process", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.slow_client_process:
        host, port = args.slow_client_process.rsplit(":", 1)
        asyncio.run(_slow_clients(host, int(port), args.ca, args.slow, args.duration))
        return 0

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
            results = []
            if not args.skip_throughput:
                results = asyncio.run(_run_variant(wp.url, out / "ca.crt", args))
            hostile = []
            if variant.startswith("default") and not args.skip_hostile:
                hostile = asyncio.run(_hostile(wp.url, out / "ca.crt", wp.proc.pid, args))
        finally:
            wp.stop()
        if results:
            _report(variant, results)
        failed += sum(r.failures for r in results)
        if hostile:
            _report("hostile load (server as shipped)", hostile)
            failed += sum(r.failures for r in hostile)
    print(f"\nfailed requests: {failed}; load average after: {os.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
