"""Human-readable warm-up progress for ``kubectl logs``: one line every few seconds.

Bytes found already in the cache (or fetched by another pod on the node) count towards
"done" but not towards the rate, so the MB/s and the ETA describe this pod's downloads; while
this pod has downloaded nothing, the line says where the bytes come from instead of showing a
rate of 0.0 MB/s. The final summary is the caller's (``sidecar.warmup.WarmupReport``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("sidecar.warmup")

INTERVAL = 5.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def human_rate(n_bytes: float, seconds: float) -> str:
    """Decimal MB/s, as network speeds are quoted."""
    return f"{n_bytes / max(seconds, 1e-6) / 1e6:.1f} MB/s"


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Counters updated by the downloads plus a periodic reporter task."""

    def __init__(
        self,
        *,
        interval: float = INTERVAL,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.emit = emit or log.info
        self.clock = clock
        self.total_bytes = 0
        self.total_files = 0
        self.done_bytes = 0
        self.fetched_bytes = 0
        self.done_files = 0
        self.started = clock()
        self._task: asyncio.Task[None] | None = None

    def add_total(self, files: int, size: int) -> None:
        self.total_files += files
        self.total_bytes += size

    def add_fetched(self, n: int) -> None:
        """Bytes this process downloaded (count towards the rate)."""
        self.fetched_bytes += n
        self.done_bytes += n

    def file_done(self, size: int, fetched: int) -> None:
        """A file became complete; ``fetched`` of its ``size`` bytes were counted already."""
        self.done_files += 1
        self.done_bytes += max(0, size - fetched)

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = self.fetched_bytes / elapsed
        left = max(0, self.total_bytes - self.done_bytes)
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        head = (
            f"{human_bytes(self.done_bytes)} / {human_bytes(self.total_bytes)} ({pct:.0f}%), "
            f"files {self.done_files}/{self.total_files}"
        )
        if not self.fetched_bytes:
            # nothing downloaded by this pod (yet): a rate of 0.0 MB/s would read as a stall
            where = "from the node cache" if self.done_bytes else "waiting for the first bytes"
            return f"{head}, {where}"
        eta = human_duration(left / rate) if rate > 0 and left else ("0s" if not left else "?")
        return f"{head}, {human_rate(self.fetched_bytes, elapsed)}, ETA {eta}"

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.emit(f"warmup: {self.line()}")

    def start(self) -> None:
        self.started = self.clock()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._report())

    async def stop(self, final: str | None = None) -> None:
        """Stop the periodic lines; emit ``final`` when given (the caller's summary)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if final is not None:
            self.emit(final)
