"""Admission cost grows linearly with the size of the pod.

Two pod sizes are admitted in the same run and the ratio of their CPU costs is compared, so
the test holds on any machine: four times the containers must cost about four times as much
(a path that compares every container with every other costs 16x; measured 10x at these
sizes before the pipeline was made linear, 4.4x after).
"""

from __future__ import annotations

import gc
import time
from typing import Any

from webhook.config import Config
from webhook.pipeline import admit_pod

SMALL = 1000
GROWTH = 4
#: A pod GROWTH times larger may cost at most this many times as much (linear: 4).
MAX_RATIO = 6.0


def _pod(containers: int) -> dict[str, Any]:
    """A model pod of many small app containers, each serving the annotated Hub model."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "wide-",
            "annotations": {"modelcache.io/model": "hf://org/model"},
        },
        "spec": {
            "containers": [
                {
                    "name": f"c{i}",
                    "image": "vllm/vllm-openai:v0.6.0",
                    "args": ["--model", "org/model", "--port", str(8000 + i % 1000)],
                }
                for i in range(containers)
            ]
        },
    }


def _cpu_seconds(containers: int, rounds: int = 2) -> float:
    """Best of ``rounds`` admissions (process CPU time: other processes do not count)."""
    config = Config()
    best = float("inf")
    for _ in range(rounds):
        pod = _pod(containers)
        gc.collect()
        start = time.process_time()
        result = admit_pod(pod, namespace="ml", config=config)
        best = min(best, time.process_time() - start)
        assert result.decision == "injected", result.reason
    return best


def test_pod_shape_is_injected_into_every_container() -> None:
    result = admit_pod(_pod(3), namespace="ml", config=Config())
    assert result.decision == "injected"
    assert "c0" in result.reason and "c2" in result.reason


def test_admission_cost_is_linear_in_the_number_of_containers() -> None:
    _cpu_seconds(100)  # warm caches and imports outside the measurement
    small = _cpu_seconds(SMALL)
    large = _cpu_seconds(GROWTH * SMALL)
    ratio = large / small
    assert ratio < MAX_RATIO, (
        f"{SMALL} containers: {small:.3f} s, {GROWTH * SMALL}: {large:.3f} s, ratio {ratio:.2f}"
    )
