"""A pod's model is not evicted while its sidecar restarts.

The app container sees the model through a bind mount of ``data/`` taken at pod start; if
the agent evicted the model while nothing held ``.model.lock`` (a crashed sidecar waiting for
its restart, or the gap between the warm-up and the sidecar), that view would stay empty for
good. The warm-up and the mount pin the model for their pod; the agent evicts a pinned model
only after the pin expired (the pod is gone and nobody renews it).

Real warm-up and mount processes on real FUSE, the agent against the API stand-in.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sidecar.agent import Agent, AgentSettings, PassResult, RetryPolicy
from sidecar.cache import NodeCache
from sidecar.layout import PIN_TTL, ModelDir
from sidecar.modelsource import parse_model_arg
from tests.fixtures.kube_nodes import FakeNodeAPI
from tests.fixtures.modelgen import generate_model

REPO = Path(__file__).resolve().parents[2]
NODE = "gpu-node-1"
FAST = RetryPolicy(attempts=3, base=0.001, cap=0.01)


def _agent_pass(cache: Path, kube: FakeNodeAPI) -> PassResult:
    async def once() -> PassResult:
        settings = AgentSettings(cache_dir=cache, node=NODE, max_bytes=1, retry=FAST)
        agent = Agent(settings, kube.api_client())
        try:
            return await agent.run_pass()
        finally:
            await agent.close()

    return asyncio.run(once())


def test_restarting_sidecar_keeps_its_model_until_the_pod_is_gone(
    tmp_path: Path, kube_nodes: FakeNodeAPI, fuse_available: None, sidecar_mount: object
) -> None:
    kube_nodes.add_node(NODE)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    info = generate_model(tmp_path / "src" / "llm", total_bytes=200_000, shards=2, seed=7)
    arg = f"llm=file://{info.root}"
    key = parse_model_arg(arg).source.cache_key
    md = ModelDir(cache, key)

    # the pod's warm-up init container
    env = dict(os.environ, MODELCACHE_POD="pod-a", PYTHONPATH=str(REPO))
    warm = subprocess.run(
        [
            *(sys.executable, "-m", "sidecar", "warmup", "--cache-dir", str(cache)),
            *("--model", arg, "--file-root", str(info.root)),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert warm.returncode == 0, warm.stderr
    assert NodeCache(cache).live_pins(key) == ["pod-a"]

    # the pod's sidecar serves it; the app's view is a bind mount of data/ (here: a
    # descriptor of the same directory, which keeps the same inode the same way)
    mount = sidecar_mount(cache, mnt, [arg], "--link-root", "cache")  # type: ignore[operator]
    mount.wait_ready(["llm"])
    app_view = os.open(md.data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = sorted(os.listdir(app_view))
        assert names

        # the sidecar crashes: until the kubelet restarts it, nothing holds the model lock
        mount.signal(signal.SIGKILL)
        mount.wait()
        result = _agent_pass(cache, kube_nodes)  # bound of 1 byte: everything is a candidate
        assert result.ok
        assert result.evicted == []
        assert key in result.skipped_in_use
        assert sorted(os.listdir(app_view)) == names  # the app still sees its model

        # the restarted sidecar serves it again, byte for byte
        again = sidecar_mount(cache, mnt, [arg], "--link-root", "cache")  # type: ignore[operator]
        again.wait_ready(["llm"])
        shard = info.weight_files[0]
        served = hashlib.sha256((mnt / "llm" / shard).read_bytes()).hexdigest()
        assert served == info.files[shard].sha256
        assert again.stop() == 0

        # the pod is gone: nobody renews its pins, they expire, and the model may go
        expired = time.time() - PIN_TTL - 1
        for pin in md.pins_dir.iterdir():
            os.utime(pin, (expired, expired))
        result = _agent_pass(cache, kube_nodes)
        assert result.evicted == [key]
        assert not md.root.exists()
    finally:
        os.close(app_view)
