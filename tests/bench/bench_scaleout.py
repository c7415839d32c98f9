"""Scale-out benchmark: N cold nodes fetch the same model at once, peers off, then on.

``python -m tests.bench.bench_scaleout`` (``make bench-scaleout``; root: ``ip netns``, ``tc``,
nginx). It prints exactly these first lines, then details::

    scale-out: <N> nodes, model <X> GiB, origin cap <Y> MiB/s, node NIC <Z> MiB/s
    no peers: all ready in <A> s, origin bytes <B> (<C>x model)
    peers: all ready in <D> s, origin bytes <E> (<F>x model)

The network (``tests.bench.netns``): a switch namespace with a bridge, where this
orchestrator and the Kubernetes API stand-in run; an origin namespace with nginx serving the
generated model (JSON autoindex, an ``http://`` source), its egress capped by ``tbf`` to the
origin cap; and N node namespaces, each NIC capped both ways to the node cap (4x the origin
cap by default). Addresses are a private /24 that exists only inside those namespaces.

Each node is ``tests.bench.scaleout_node``: the agent's peer service (mutual TLS, a
certificate it issues itself from the agents' CA at start) and the CSI node plugin's
publisher with its own node cache (tmpfs: eight real nodes would have eight disks, not one).
All N get the order to publish the model at once; the model is ready on a node when its
fill completed and the access check finds it complete and current. "All ready" is the time
from the order until the last node is ready. Origin bytes are the file bytes nginx sent
(its access log), listings excluded. Both runs use the same nodes and network, caches
emptied in between; the run with peers goes second, so no node holds anything from it.

The node caches use a smaller part size than the default 16 MiB (``--part-size``, 2 MiB):
parts are the unit of sharing between nodes still fetching, and a 0.12 GiB model in 16 MiB
parts would have 8 of them; 2 MiB parts give the model about as many parts as a 1 GiB model
has at the default.

``MODELCACHE_BENCH_DEBUG=1`` lists every piece the origin sent (path, range, node, seconds
into the run) on stderr, marking the ones it sent more than once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.bench.netns import SWITCH_IP, NetnsError, Network, missing_tools

NGINX = os.environ.get("MODELCACHE_NGINX", "/usr/sbin/nginx")
MODEL_DIR = Path(os.environ.get("MODELCACHE_BENCH_DIR", "/var/tmp/modelcache-bench")) / "scaleout"
ORIGIN_HOST = 2
ORIGIN_PORT = 8080
NODE_HOST0 = 10
MiB = 1 << 20

_NGINX_CONF = """\
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
{user}
events {{ worker_connections 1024; }}
http {{
    log_format bench '$status $body_bytes_sent $remote_addr $msec "$request" "$http_range"';
    access_log {tmp}/access.log bench;
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    server {{
        listen {ip}:{port};
        root {root};
        autoindex on;
        autoindex_format json;
    }}
}}
"""


@dataclass
class OriginLog:
    """What nginx sent in one run: file bytes by client, and the pieces sent more than once
    (their seconds since the run started, and bytes)."""

    by_client: dict[str, int]
    repeats: list[tuple[float, int]]


def read_origin_log(log: Path, offset: int, started: float) -> OriginLog:
    """The file requests nginx logged after ``offset`` (directory listings excluded)."""
    by_client: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    repeats = []
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            status, sent, client, msec, rest = line.split(" ", 4)
            quoted = rest.split('"')
            uri = quoted[1].split(" ")[1] if len(quoted) > 1 and " " in quoted[1] else ""
            if status not in ("200", "206") or uri.endswith("/"):
                continue
            by_client[client] = by_client.get(client, 0) + int(sent)
            piece = (uri, quoted[3] if len(quoted) > 3 else "")
            if piece in seen:
                repeats.append((float(msec) - started, int(sent)))
                if os.environ.get("MODELCACHE_BENCH_DEBUG"):
                    print("repeat", piece, client, float(msec) - started, file=sys.stderr)
            elif os.environ.get("MODELCACHE_BENCH_DEBUG"):
                print("first", piece, client, float(msec) - started, file=sys.stderr)
            seen.add(piece)
    return OriginLog(by_client, sorted(repeats))


def _node_ip(i: int) -> str:
    return f"{SWITCH_IP.rsplit('.', 1)[0]}.{NODE_HOST0 + i}"


def _wait_port(ip: str, port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {ip}:{port}")


@dataclass
class NodeProc:
    name: str
    proc: subprocess.Popen[str]
    lines: queue.Queue[tuple[float, dict[str, Any]]] = field(default_factory=queue.Queue)

    def start_reader(self) -> None:
        def read(out: IO[str]) -> None:
            for line in out:
                with contextlib.suppress(ValueError):
                    self.lines.put((time.monotonic(), json.loads(line)))
            self.lines.put((time.monotonic(), {"ok": False, "error": "the node process ended"}))

        assert self.proc.stdout is not None
        threading.Thread(target=read, args=(self.proc.stdout,), daemon=True).start()

    def send(self, order: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(order + "\n")
        self.proc.stdin.flush()

    def answer(self, deadline: float) -> tuple[float, dict[str, Any]]:
        try:
            return self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no answer in time") from None


@dataclass
class RunResult:
    elapsed: float
    origin: OriginLog
    per_node: dict[str, float]

    @property
    def per_client(self) -> dict[str, int]:
        return self.origin.by_client

    @property
    def origin_bytes(self) -> int:
        return sum(self.per_client.values())


def run_once(nodes: list[NodeProc], mode: str, access_log: Path, timeout: float) -> RunResult:
    for n in nodes:
        n.send("reset")
    for n in nodes:
        _, ans = n.answer(time.monotonic() + 30)
        if not ans.get("ok"):
            raise RuntimeError(f"{n.name}: reset failed: {ans}")
    offset = access_log.stat().st_size
    started = time.monotonic()
    started_epoch = time.time()
    for n in nodes:
        n.send(f"go {mode}")
    deadline = started + timeout
    per_node = {}
    for n in nodes:
        at, ans = n.answer(deadline)
        if not ans.get("ok"):
            raise RuntimeError(f"{n.name}: {mode} run failed: {ans.get('error')}")
        per_node[n.name] = at - started
    elapsed = max(per_node.values())
    time.sleep(0.2)  # nginx writes the log line of a request after its last byte is sent
    return RunResult(elapsed, read_origin_log(access_log, offset, started_epoch), per_node)


def inner(args: argparse.Namespace) -> int:
    """Runs in the switch namespace: origin, API stand-in, nodes, both runs."""
    from certs.issue import issue_ca
    from tests.fixtures.kube_nodes import FakeNodeAPI
    from tests.fixtures.modelgen import generate_model

    net = Network(args.prefix)
    work = Path(args.workdir)
    model_bytes = int(args.model_mib * MiB)
    info = generate_model(
        MODEL_DIR / "scale-llama", total_bytes=model_bytes, shards=4, seed=11, reuse=True
    )
    total = info.total_bytes
    origin_ip = f"{SWITCH_IP.rsplit('.', 1)[0]}.{ORIGIN_HOST}"
    ngx = work / "nginx"
    ngx.mkdir()
    (ngx / "nginx.conf").write_text(
        _NGINX_CONF.format(
            tmp=ngx,
            user="user root;",
            ip=origin_ip,
            port=ORIGIN_PORT,
            root=MODEL_DIR.resolve(),
        )
    )
    procs: list[subprocess.Popen[Any]] = []
    nginx = subprocess.Popen(
        net.exec_argv(
            "org", [NGINX, "-c", str(ngx / "nginx.conf"), "-p", str(ngx), "-g", "daemon off;"]
        ),
        stdout=subprocess.DEVNULL,
        stderr=open(ngx / "stderr.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    procs.append(nginx)
    kube = FakeNodeAPI(host=SWITCH_IP)
    kube.start()
    nodes: list[NodeProc] = []
    try:
        try:
            _wait_port(origin_ip, ORIGIN_PORT, time.monotonic() + 15)
        except RuntimeError:
            err = (ngx / "stderr.log").read_text(errors="replace").strip()
            raise RuntimeError(f"nginx did not start in the origin namespace: {err}") from None
        ca_cert, ca_key = issue_ca("modelcache-agents bench")
        for i in range(args.nodes):
            name = f"node-{i}"
            kube.add_node(name)
            tls = work / name / "tls"
            tls.mkdir(parents=True)
            (tls / "ca.crt").write_bytes(ca_cert)
            (tls / "ca.key").write_bytes(ca_key)
            ip = _node_ip(i)
            argv = [
                sys.executable,
                "-m",
                "tests.bench.scaleout_node",
                "--node",
                name,
                "--ip",
                ip,
                "--api",
                kube.url,
                "--cache-dir",
                str(work / name / "cache"),
                "--tls-dir",
                str(tls),
                "--model",
                f"http://{origin_ip}:{ORIGIN_PORT}/scale-llama/",
                "--part-size",
                str(int(args.part_mib * MiB)),
                "--timeout",
                str(args.run_timeout),
            ]
            p = subprocess.Popen(
                net.exec_argv(f"n{i}", argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            procs.append(p)
            node = NodeProc(name, p)
            node.start_reader()
            nodes.append(node)
        for n in nodes:
            _, ans = n.answer(time.monotonic() + 60)
            if not ans.get("ok"):
                raise RuntimeError(f"{n.name} did not start: {ans}")
        off = run_once(nodes, "origin", ngx / "access.log", args.run_timeout)
        on = run_once(nodes, "peers", ngx / "access.log", args.run_timeout)
        print(
            f"scale-out: {args.nodes} nodes, model {total / (1 << 30):.2f} GiB, "
            f"origin cap {args.origin_mib:g} MiB/s, node NIC {args.nic_mib:g} MiB/s"
        )
        print(
            f"no peers: all ready in {off.elapsed:.1f} s, origin bytes {off.origin_bytes} "
            f"({off.origin_bytes / total:.2f}x model)"
        )
        print(
            f"peers: all ready in {on.elapsed:.1f} s, origin bytes {on.origin_bytes} "
            f"({on.origin_bytes / total:.2f}x model)"
        )
        ratio = on.elapsed / off.elapsed
        print(
            f"peers vs no peers: all-ready time {ratio:.2f}x (goal <= 0.35x), origin bytes "
            f"{on.origin_bytes / total:.2f}x model (goal <= 1.2x): "
            f"{'met' if ratio <= 0.35 and on.origin_bytes <= 1.2 * total else 'NOT met'}"
        )
        print(
            f"model: {len(info.files)} files, {total} bytes, part size {args.part_mib:g} MiB; "
            f"ideal all-ready times: {args.nodes * total / MiB / args.origin_mib:.1f} s without "
            f"peers (N copies through the origin cap), {total / MiB / args.origin_mib:.1f} s "
            "with (one copy)"
        )
        for label, res in (("no peers", off), ("peers", on)):
            times = " ".join(f"{t:.1f}" for t in sorted(res.per_node.values()))
            shares = " ".join(
                f"{res.per_client.get(ip, 0) / total:.2f}"
                for ip in (_node_ip(i) for i in range(args.nodes))
            )
            print(f"{label}: ready times per node (s): {times}")
            print(f"{label}: origin bytes per node (x model): {shares}")
        repeats = on.origin.repeats
        when = " ".join(f"{t:.1f}" for t, _ in repeats[:40]) + (" ..." if len(repeats) > 40 else "")
        print(
            f"peers: pieces the origin sent more than once: {len(repeats)}, "
            f"{sum(n for _, n in repeats) / MiB:.1f} MiB; sent at (s): {when or '-'}"
        )
        return 0
    finally:
        for n in nodes:
            with contextlib.suppress(OSError, ValueError):
                n.send("exit")
        for p in procs[1:]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        nginx.terminate()
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait(10)
        kube.stop()


def skip_reason() -> str | None:
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, tc)"
    if missing_tools():
        return f"{', '.join(missing_tools())} not installed (iproute2)"
    if not os.access(NGINX, os.X_OK):
        return f"nginx not found at {NGINX} (Debian package nginx-light)"
    return None


def outer(args: argparse.Namespace) -> int:
    """Sets the network up, runs :func:`inner` in the switch namespace, tears it all down."""
    reason = skip_reason()
    if reason:
        print(f"bench-scaleout skipped: {reason}")
        return 0
    # SIGTERM ends the run through the same teardown as a failure
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    net = Network(f"mcso{os.getpid() % 100000}-")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="modelcache-scaleout-", dir=base))
    os.chmod(work, 0o755)
    try:
        net.create()
        net.add("org", ORIGIN_HOST, egress_mib=args.origin_mib, ingress_mib=None)
        for i in range(args.nodes):
            net.add(f"n{i}", NODE_HOST0 + i, egress_mib=args.nic_mib, ingress_mib=args.nic_mib)
        argv = [
            sys.executable,
            "-m",
            "tests.bench.bench_scaleout",
            "--inner",
            "--prefix",
            net.prefix,
            "--workdir",
            str(work),
            *_common_argv(args),
        ]
        budget = 2 * args.run_timeout + 120
        try:
            code = subprocess.run(net.exec_argv("", argv), timeout=budget, check=False).returncode
            if code < 0:
                print(f"bench-scaleout: the run was killed by signal {-code}", file=sys.stderr)
                return 1
            return code
        except subprocess.TimeoutExpired:
            print(f"bench-scaleout: gave up after {budget:.0f} s", file=sys.stderr)
            return 1
    except NetnsError as exc:
        print(f"bench-scaleout: network setup failed: {exc}", file=sys.stderr)
        return 1
    finally:
        net.teardown()
        shutil.rmtree(work, ignore_errors=True)
        left = net.leftovers()
        if left:
            print(f"bench-scaleout: namespaces left behind: {left}", file=sys.stderr)


def _common_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--nodes",
        str(args.nodes),
        "--model-mib",
        f"{args.model_mib:g}",
        "--origin-mib",
        f"{args.origin_mib:g}",
        "--nic-mib",
        f"{args.nic_mib:g}",
        "--part-mib",
        f"{args.part_mib:g}",
        "--run-timeout",
        f"{args.run_timeout:g}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.bench_scaleout", description=__doc__)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--model-mib", type=float, default=128, help="model size (MiB)")
    p.add_argument("--origin-mib", type=float, default=10, help="origin egress cap (MiB/s)")
    p.add_argument("--nic-mib", type=float, default=None, help="node NIC cap (default 4x origin)")
    p.add_argument("--part-mib", type=float, default=2, help="node cache part size (MiB)")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per run")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nic_mib is None:
        args.nic_mib = 4 * args.origin_mib
    if args.run_timeout is None:
        # twice the time N copies take through the origin cap, plus start-up
        args.run_timeout = 2 * args.nodes * args.model_mib / args.origin_mib + 60
    if not 1 <= args.nodes <= 200 or args.model_mib <= 0 or args.origin_mib <= 0:
        p.error("--nodes 1-200, --model-mib and --origin-mib > 0")
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
