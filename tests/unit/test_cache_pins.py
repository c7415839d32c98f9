"""Pins: a pod's claim on a model that outlives a restart of its sidecar, and expires."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sidecar.cache import NodeCache, pin_holder, safe_pin_name
from sidecar.layout import PIN_TTL


@pytest.mark.parametrize(
    ("holder", "name"),
    [
        ("llm-7d9f-abcde", "llm-7d9f-abcde"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("a/b", "a_b"),
        ("..", "unnamed"),
        ("", "unnamed"),
    ],
)
def test_pin_names_stay_in_the_pins_directory(holder: str, name: str) -> None:
    assert safe_pin_name(holder) == name


def test_pin_holder_is_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELCACHE_POD", "3f2a-uid")
    assert pin_holder() == "3f2a-uid"
    monkeypatch.delenv("MODELCACHE_POD")
    assert pin_holder() == safe_pin_name(os.uname().nodename)


def test_pins_live_renew_and_expire(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    cache.pin("k1", "pod-a")
    cache.pin("k1", "pod-b")
    assert cache.live_pins("k1") == ["pod-a", "pod-b"]
    old = time.time() - PIN_TTL - 1
    pin_a = cache.model_dir("k1").pin_file("pod-a")
    os.utime(pin_a, (old, old))
    assert cache.live_pins("k1") == ["pod-b"]
    cache.pin("k1", "pod-a")  # renewed
    assert cache.live_pins("k1") == ["pod-a", "pod-b"]
    os.utime(pin_a, (old, old))
    assert cache.prune_pins("k1") == 1
    assert not pin_a.exists()
    assert cache.live_pins("never-pinned") == []
    assert cache.prune_pins("never-pinned") == 0
