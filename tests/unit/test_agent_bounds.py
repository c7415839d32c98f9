"""Node agent bounds: a model with no files is never ready, and the node's cache labels are
capped (most recently used first) so the Node object stays small whatever the cache holds.

Against the Kubernetes API stand-in through the real ``kubernetes`` client. Before the cap,
2,000 models in the cache (half of them with a manifest listing no files) gave 2,000 labels
and a Node object of about 160 KB, sent to every scheduler and kubelet watching nodes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from sidecar.agent import (
    DEFAULT_MAX_LABELS,
    LABEL_PREFIX,
    Agent,
    AgentSettings,
    ModelState,
    RetryPolicy,
    check_ready,
    labelled_keys,
)
from sidecar.cache import CacheError, NodeCache
from sidecar.layout import ModelDir
from sidecar.modelsource import parse_model_arg
from tests.fixtures.agent_cache import write_model
from tests.fixtures.kube_nodes import NODES, FakeNodeAPI

NODE = "node-a"
FAST = RetryPolicy(attempts=4, base=0.001, cap=0.01)


def test_a_manifest_with_no_files_is_not_ready(tmp_path: Path) -> None:
    mdir = write_model(tmp_path, "hf://org/empty", {})
    assert check_ready(mdir) == "manifest lists no files"
    assert not NodeCache(tmp_path).is_complete(mdir.key)
    m = parse_model_arg("m=hf://org/empty")
    with pytest.raises(CacheError, match="lists no files"):
        NodeCache(tmp_path).write_manifest(m, [])


def _state(key: str, used: float, ready: bool = True) -> ModelState:
    return ModelState(key=key, path=Path(key), ready=ready, bytes=1, last_used=used)


def test_labelled_keys_most_recent_first_and_capped() -> None:
    models = [
        _state("old", 1),
        _state("new", 3),
        _state("mid", 2),
        _state("newest-but-partial", 9, ready=False),
        _state("not a label!", 8),
    ]
    assert labelled_keys(models, 2) == ["new", "mid"]
    assert labelled_keys(models, 10) == ["new", "mid", "old"]
    assert labelled_keys(models, 0) == []


async def test_two_thousand_models_keep_the_node_small(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE, {"kubernetes.io/hostname": NODE, "gpu": "a100"})
    now = time.time()
    complete, empty = [], []
    for i in range(2000):
        uri = f"hf://org/model-{i:04d}"
        files = {"config.json": b"{}"} if i % 2 else {}
        mdir = write_model(tmp_path, uri, files, last_used=now - 10_000 + i)
        (complete if files else empty).append(mdir.key)
    agent = Agent(AgentSettings(cache_dir=tmp_path, node=NODE, retry=FAST), kube_nodes.api_client())
    try:
        assert (await agent.run_pass()).ok
    finally:
        await agent.close()
    labels = kube_nodes.labels(NODE)
    cache_labels = sorted(
        k.removeprefix(LABEL_PREFIX) for k in labels if k.startswith(LABEL_PREFIX)
    )
    # the 64 most recently used complete models, none of the empty ones
    assert len(cache_labels) == DEFAULT_MAX_LABELS == 64
    assert cache_labels == sorted(complete[-64:])
    assert not set(cache_labels) & set(empty)
    assert labels["gpu"] == "a100"
    size = len(json.dumps(kube_nodes.get(f"{NODES}/{NODE}")))
    print(f"node object: {size} bytes with {len(labels)} labels")
    assert size < 8_000, size  # was ~160 KB with every model labelled

    # a model used now enters, the least recently used labelled one leaves, in one patch
    kube_nodes.clear_requests()
    oldest_labelled = complete[-64]
    revived = complete[0]
    os.utime(ModelDir(tmp_path, revived).last_used)  # used just now
    agent = Agent(AgentSettings(cache_dir=tmp_path, node=NODE, retry=FAST), kube_nodes.api_client())
    try:
        result = await agent.run_pass()
    finally:
        await agent.close()
    assert result.patched == {
        LABEL_PREFIX + revived: "ready",
        LABEL_PREFIX + oldest_labelled: None,
    }
    assert len(kube_nodes.patches()) == 1
