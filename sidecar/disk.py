"""Disk sizes for the node cache: ``--max-bytes`` and ``--min-free`` values, and free space.

A size is absolute (``500Gi``, ``200G``, ``1073741824``) or a share of the filesystem that
holds the cache (``50%``), resolved at every pass so the same DaemonSet args fit nodes with
different disks. ``0`` switches the bound off.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: What the agent gets without flags: half the disk for models, and 15% of it kept free
#: (above the kubelet's default hard eviction threshold, nodefs.available < 10%).
DEFAULT_MAX_BYTES: Final = "50%"
DEFAULT_MIN_FREE: Final = "15%"

_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?|[kmgtp]i?)?[Bb]?\s*$")
_PERCENT_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_UNITS: Final = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "p": 10**15,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
    "pi": 1 << 50,
}


@dataclass(frozen=True)
class Size:
    """Bytes, or a percentage of the filesystem's size."""

    bytes: int = 0
    percent: float | None = None

    def resolve(self, fs_size: int) -> int:
        if self.percent is not None:
            return int(fs_size * self.percent / 100)
        return self.bytes

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.bytes)


def parse_size(text: str) -> Size:
    """``"50%"``, ``"500Gi"``, ``"200G"``, ``"1073741824"``; ValueError naming what is wrong."""
    m = _PERCENT_RE.match(text)
    if m:
        pct = float(m.group(1))
        if not 0 <= pct <= 100:
            raise ValueError(f"{text!r}: a percentage must be between 0% and 100%")
        return Size(percent=pct)
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(
            f"{text!r}: expected bytes (1073741824), a size with a unit (500Gi, 200G) or a "
            "percentage of the disk (50%)"
        )
    unit = (m.group(2) or "").lower()
    return Size(bytes=int(float(m.group(1)) * _UNITS[unit]))


@dataclass(frozen=True)
class DiskUsage:
    """The filesystem holding the cache: its size and the bytes unprivileged writers may use."""

    size: int
    free: int


def disk_usage(path: Path) -> DiskUsage:
    """``statvfs`` of ``path``, or of its nearest existing parent (a cache not created yet)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return DiskUsage(size=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)
