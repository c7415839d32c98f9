"""Golden files: every case through ``run_inject``; outputs valid, idempotent, all used.

``MODELCACHE_UPDATE_GOLDEN=1`` rewrites the expected files from the current output.
"""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
import yaml

from tests.fixtures.podcheck import api_server_violations, validate_pod_strict
from tests.fixtures.podsecurity import added_violations
from tests.golden.cases import CASES_DIR, GoldenCase, golden_files, load_cases
from webhook.config import Config
from webhook.inject import run_inject
from webhook.workloads import pod_slots

UPDATE = os.environ.get("MODELCACHE_UPDATE_GOLDEN") == "1"
CASES = load_cases()
CONFIG = Config()


def inject(text: str, config: Config = CONFIG) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = run_inject(io.StringIO(text), out, err, config)
    return rc, out.getvalue(), err.getvalue()


def _write(name: str, suffix: str, text: str) -> None:
    path = CASES_DIR / f"{name}{suffix}"
    if text:
        path.write_text(text, encoding="utf-8")
    elif path.exists():
        path.unlink()


def test_enough_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: GoldenCase) -> None:
    rc, out, err = inject(case.input, case.config)
    if UPDATE:
        _write(case.name, ".yaml.injected", out if rc == 0 else "")
        _write(case.name, ".warnings", err if rc == 0 else "")
        _write(case.name, ".denied", err if rc != 0 else "")
        return
    if case.denied is not None:
        assert rc == 1
        assert err == case.denied
        assert out == ""
        return
    assert rc == 0, err
    assert out == case.expected
    assert err == case.warnings


def _pods(docs: list[Any]) -> list[dict[str, Any]]:
    return [slot.pod for i in range(len(docs)) for slot in pod_slots(docs, i)]


@pytest.mark.parametrize("case", [c for c in CASES if c.denied is None], ids=lambda c: c.name)
def test_golden_output_valid_and_idempotent(case: GoldenCase) -> None:
    if UPDATE:
        pytest.skip("regenerating golden files (MODELCACHE_UPDATE_GOLDEN=1)")
    docs = list(yaml.safe_load_all(case.expected))
    assert docs, "empty golden output"
    for doc in docs:
        for item in doc["items"] if doc["kind"] == "List" else [doc]:
            validate_pod_strict(item)
    for pod in _pods(docs):
        assert api_server_violations(pod) == []
    if case.config.node_cache == "csi":
        # what the webhook adds meets PodSecurity restricted, and a pod that met restricted
        # (or baseline) before still does (hostPath cases: the legacy shape is privileged)
        before = _pods([d for d in yaml.safe_load_all(case.input) if d is not None])
        after = _pods(docs)
        assert len(before) == len(after)
        for old, new in zip(before, after, strict=True):
            assert [str(v) for v in added_violations(old, new)] == []
    rc, again, _ = inject(case.expected, case.config)
    assert rc == 0
    assert again == case.expected


def test_no_unused_golden_files() -> None:
    if UPDATE:
        pytest.skip("regenerating golden files (MODELCACHE_UPDATE_GOLDEN=1)")
    inputs = {c.name for c in CASES}
    unused = sorted(
        p.name
        for p in golden_files()
        if p.name.split(".yaml")[0].split(".warnings")[0].split(".denied")[0].split(".config")[0]
        not in inputs
    )
    assert unused == []
    # every case has exactly one outcome file
    for case in CASES:
        assert (case.denied is None) == bool(case.expected), case.name


def test_warnings_fit_the_admission_response_limit() -> None:
    """The API server may truncate warnings over 256 characters: ours stay well under."""
    for case in CASES:
        for line in case.warnings.splitlines():
            message = line.split(": ", 2)[2]
            assert len(message) <= 200, (case.name, message)
