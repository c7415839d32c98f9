"""Warm-up records in the node cache: written whole, read once, bounded without an agent."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sidecar import journal
from sidecar.warmup import Failure, ModelReport, WarmupReport


def _report(fetched: int) -> WarmupReport:
    return WarmupReport(
        models=[ModelReport("m", "hf://o/m@main", "o-m-1", 2, 100, fetched, ok=True)]
    )


def test_records_are_taken_once_in_order(tmp_path: Path) -> None:
    journal.record_warmup(tmp_path, _report(100))
    journal.record_warmup(tmp_path, _report(0))
    records = journal.take_records(tmp_path)
    assert [r["models"][0]["result"] for r in records] == ["miss", "hit"]
    assert records[1]["models"][0]["cached_bytes"] == 100
    assert journal.take_records(tmp_path) == []


def test_a_failed_model_records_its_kind() -> None:
    report = WarmupReport(
        models=[ModelReport("x", "s3://b/p", "b-p-1")],
        failures=[Failure("x", "s3://b/p", "forbidden", "forbidden (HTTP 403 ...)")],
    )
    record = journal.warmup_record(report)
    assert record["result"] == "failed" and record["reasons"] == ["forbidden"]
    assert record["models"] == [
        {
            "key": "b-p-1",
            "result": "failed",
            "reason": "forbidden",
            "bytes": 0,
            "fetched_bytes": 0,
            "cached_bytes": 0,
        }
    ]


def test_without_an_agent_the_records_stop_at_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "MAX_PENDING", 3)
    for _ in range(5):
        journal.record_warmup(tmp_path, _report(1))
    assert len(list(journal.events_root(tmp_path).iterdir())) == 3


def test_broken_and_stale_files_are_dropped(tmp_path: Path) -> None:
    root = journal.events_root(tmp_path)
    root.mkdir()
    (root / "1-1-aa.json").write_text("{half a rec")
    stale = root / ".2-2-bb.tmp"
    stale.write_text("{}")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = root / ".3-3-cc.tmp"
    fresh.write_text("{}")  # a writer between write and rename: left alone
    assert journal.take_records(tmp_path) == []
    assert sorted(p.name for p in root.iterdir()) == [fresh.name]


def test_an_unwritable_cache_does_not_fail_the_warm_up(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    journal.record_warmup(blocker, _report(1))  # events/ cannot be created under a file
    assert blocker.read_text() == ""
