"""Warm-up outcomes recorded in the node cache, counted by the node agent.

A warm-up init container lives for seconds and serves no metrics, but it runs on the node
and writes the node cache. So each run leaves one small JSON record under
``<cache-dir>/events/`` (written to a temporary name, then renamed: the agent never reads
half a record), and the agent, which serves ``/metrics``, reads and deletes them every
pass and adds them to its counters: cache hits, misses, bytes not downloaded thanks to the
cache, warm-ups that failed and why. Without the agent, at most :data:`MAX_PENDING` records
wait (then new ones are dropped), so the directory never grows without bound.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from sidecar.warmup import WarmupReport

log = logging.getLogger(__name__)

EVENTS_DIR: Final = "events"
MAX_PENDING: Final = 10_000
_SUFFIX: Final = ".json"


def events_root(cache_dir: Path | str) -> Path:
    return Path(cache_dir) / EVENTS_DIR


def warmup_record(report: WarmupReport) -> dict[str, Any]:
    """The record of one warm-up: per model its result and bytes (pure)."""
    failed = {f.model: f.kind for f in report.failures}
    models = []
    for m in report.models:
        result = "hit" if m.hit else "miss" if m.ok else "failed"
        models.append(
            {
                "key": m.key,
                "result": result,
                "reason": failed.get(m.name, ""),
                "bytes": m.total_bytes,
                "fetched_bytes": m.fetched_bytes,
                "cached_bytes": m.found_bytes,
            }
        )
    return {
        "type": "warmup",
        "time": time.time(),
        "result": "failed" if report.failures else "ok",
        "reasons": sorted({f.kind for f in report.failures}),
        "models": models,
    }


def record_warmup(cache_dir: Path | str, report: WarmupReport) -> None:
    """Best effort: a node cache that cannot take the record must not fail the warm-up."""
    root = events_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with os.scandir(root) as it:
            if sum(1 for _ in it) >= MAX_PENDING:
                log.debug("%s holds %d records (no agent?): not recording", root, MAX_PENDING)
                return
        name = f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = root / f".{name}.tmp"
        tmp.write_text(json.dumps(warmup_record(report)))
        os.rename(tmp, root / f"{name}{_SUFFIX}")
    except OSError as exc:
        log.debug("cannot record the warm-up in %s: %s", root, exc)


def take_records(cache_dir: Path | str, limit: int = MAX_PENDING) -> list[dict[str, Any]]:
    """Read and delete the pending records (oldest first); unreadable ones are dropped."""
    root = events_root(cache_dir)
    try:
        names = sorted(p for p in os.listdir(root) if p.endswith(_SUFFIX))[:limit]
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        path = root / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if isinstance(data, dict):
            records.append(data)
    # temporary files of writers that died between write and rename
    now = time.time()
    with contextlib.suppress(OSError):
        for stale in root.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > 3600:
                    stale.unlink()
    return records
