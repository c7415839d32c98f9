"""A throw-away network of namespaces for benchmarks: ``ip netns``, veth pairs, a bridge, ``tc``.

Nothing touches the host's own network: the bridge lives in a namespace of its own (the
"switch", where the benchmark's orchestrator runs too), every other namespace is joined to
it by a veth pair, and all addresses are in a private /24 inside those namespaces. Bandwidth
caps are ``tbf`` qdiscs on the egress side of each link (a link's cap toward a namespace is
set on the switch's end of its pair). :meth:`Network.teardown` kills what still runs in the
namespaces (only processes the benchmark started live there), then deletes them, which
removes their links; it is safe to call twice and after a failed setup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

SUBNET = "10.199.0"
SWITCH_IP = f"{SUBNET}.1"


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up; the message names the command."""


def missing_tools() -> list[str]:
    return [t for t in ("ip", "tc") if shutil.which(t) is None]


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")


def _tbf(rate_mib: float) -> list[str]:
    """A token bucket of ``rate_mib`` MiB/s; the bucket holds a few GSO packets (veths send
    up to 64 KiB at once) or 20 ms of traffic, whichever is more."""
    burst = max(256 << 10, int(rate_mib * (1 << 20) / 50))
    return ["tbf", "rate", f"{rate_mib:g}mibps", "burst", str(burst), "latency", "200ms"]


@dataclass
class Network:
    """Namespaces ``<prefix>sw`` (switch) plus one per :meth:`add` call."""

    prefix: str
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address
    _made: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def create(self) -> None:
        _run(["ip", "netns", "add", self.switch])
        self._made.append(self.switch)
        sw = ["ip", "-n", self.switch]
        _run([*sw, "link", "set", "lo", "up"])
        _run([*sw, "link", "add", "br0", "type", "bridge"])
        _run([*sw, "addr", "add", f"{SWITCH_IP}/24", "dev", "br0"])
        _run([*sw, "link", "set", "br0", "up"])

    def add(
        self, name: str, host: int, *, egress_mib: float | None, ingress_mib: float | None
    ) -> str:
        """Namespace ``name`` at ``10.199.0.<host>``, its NIC capped both ways (MiB/s,
        None: no cap); returns its address."""
        ns = self.ns(name)
        _run(["ip", "netns", "add", ns])
        self._made.append(ns)
        port = f"p{host}"
        sw = ["ip", "-n", self.switch]
        _run([*sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run([*sw, "link", "set", port, "master", "br0"])
        _run([*sw, "link", "set", port, "up"])
        inside = ["ip", "-n", ns]
        addr = f"{SUBNET}.{host}"
        _run([*inside, "addr", "add", f"{addr}/24", "dev", "eth0"])
        _run([*inside, "link", "set", "eth0", "up"])
        _run([*inside, "link", "set", "lo", "up"])
        if egress_mib:
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", *_tbf(egress_mib)])
        if ingress_mib:
            _run(["tc", "-n", self.switch, "qdisc", "add", "dev", port, "root", *_tbf(ingress_mib)])
        self.hosts[name] = addr
        return addr

    def exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside namespace ``name`` (or the switch with ``name=""``)."""
        return ["ip", "netns", "exec", self.ns(name) if name else self.switch, *argv]

    def teardown(self, grace: float = 5.0) -> None:
        """Kill what runs in the namespaces, then delete them (bounded in time)."""
        pids: set[int] = set()
        for ns in self._made:
            proc = subprocess.run(
                ["ip", "netns", "pids", ns], check=False, capture_output=True, text=True, timeout=10
            )
            pids |= {int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                pids = {p for p in pids if os.path.exists(f"/proc/{p}")}
                time.sleep(0.05)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)
        self._made.clear()

    def leftovers(self) -> list[str]:
        out = subprocess.run(
            ["ip", "netns", "list"], check=False, capture_output=True, text=True, timeout=10
        )
        return [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith(self.prefix)]
