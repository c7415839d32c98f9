"""Node agent end to end: ``python -m sidecar agent --once`` as a process, against the loopback
node API (through its kubeconfig), a real node cache filled by the real warm-up from ``file://``
models, and a live ``python -m sidecar mount`` holding the model it serves.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from sidecar.agent import LABEL_PREFIX
from sidecar.cache import NodeCache
from sidecar.layout import ModelDir, models_root
from sidecar.modelsource import NamedModel, parse_model_arg
from sidecar.warmup import warm_models
from tests.fixtures.kube_nodes import FakeNodeAPI
from tests.fixtures.modelgen import ModelInfo, generate_model, sha256_file
from tests.fixtures.tmpfs import small_tmpfs

NODE = "gpu-node-1"
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_agent(
    kube: FakeNodeAPI, tmp_path: Path, cache: Path, *flags: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KUBECONFIG=str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster config in tests
    cmd = [sys.executable, "-m", "sidecar", "agent", "--cache-dir", str(cache), "--node", NODE]
    # no free-space floor unless a test asks for one: the outcome must not depend on how
    # full the test machine's disk is (flags given later win)
    return subprocess.run(
        [*cmd, "--once", "--min-free", "0", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )


def make_model(tmp_path: Path, name: str, seed: int) -> tuple[ModelInfo, NamedModel]:
    info = generate_model(tmp_path / "src" / name, total_bytes=120_000, shards=2, seed=seed)
    return info, parse_model_arg(f"{name}=file://{info.root}")


def label(model: NamedModel) -> str:
    return LABEL_PREFIX + model.source.cache_key


def test_prewarm_fills_the_cache_and_the_label_appears(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE, {"gpu": "a100", "kubernetes.io/hostname": NODE})
    info, model = make_model(tmp_path, "llm", seed=1)
    _, other = make_model(tmp_path, "elsewhere", seed=2)
    config = tmp_path / "prewarm.yaml"
    config.write_text(
        f"models:\n"
        f"  - model: {model.to_arg()}\n"
        f"    nodeSelector: {{gpu: a100}}\n"
        f"  - model: {other.to_arg()}\n"
        f"    nodeSelector: {{gpu: t4}}\n"
    )
    cache = tmp_path / "cache"
    done = run_agent(
        kube_nodes, tmp_path, cache, "--prewarm-config", str(config), "--file-root", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr

    data = ModelDir(cache, model.source.cache_key).data
    for rel, gen in info.files.items():
        assert sha256_file(data / rel) == gen.sha256, rel
    assert not ModelDir(cache, other.source.cache_key).root.exists()  # not for this node
    assert kube_nodes.labels(NODE) == {
        "gpu": "a100",
        "kubernetes.io/hostname": NODE,
        label(model): "ready",
    }
    assert len(kube_nodes.patches()) == 1

    # a second run finds everything in place: no fetch, no PATCH
    kube_nodes.clear_requests()
    again = run_agent(
        kube_nodes, tmp_path, cache, "--prewarm-config", str(config), "--file-root", str(tmp_path)
    )
    assert again.returncode == 0, again.stderr
    assert [r.method for r in kube_nodes.recorded()] == ["GET"]


def test_bad_prewarm_config_is_refused_naming_the_key(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE)
    config = tmp_path / "prewarm.yaml"
    config.write_text("models:\n  - model: hf://org/x\n    nodeSelectr: {gpu: a100}\n")
    done = run_agent(kube_nodes, tmp_path, tmp_path / "cache", "--prewarm-config", str(config))
    assert done.returncode == 2
    assert "models[0].nodeSelectr: unknown key" in done.stderr
    assert str(config) in done.stderr
    assert kube_nodes.recorded() == []  # refused before touching the API


def test_eviction_keeps_the_model_a_live_mount_serves(
    tmp_path: Path, kube_nodes: FakeNodeAPI, fuse_available: None, sidecar_mount: object
) -> None:
    cache = tmp_path / "cache"
    served_info, served = make_model(tmp_path, "served", seed=3)
    _, idle = make_model(tmp_path, "idle", seed=4)
    _, fresh = make_model(tmp_path, "fresh", seed=5)
    asyncio.run(warm_models(NodeCache(cache), [served, idle, fresh], file_roots=[tmp_path]))
    kube_nodes.add_node(NODE, {"gpu": "a100"})
    assert run_agent(kube_nodes, tmp_path, cache).returncode == 0
    assert {label(m) for m in (served, idle, fresh)} <= set(kube_nodes.labels(NODE))

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = sidecar_mount(cache, mnt, [served.to_arg()], "--link-root", "cache")  # type: ignore[operator]
    mount.wait_ready(["served"])
    # LRU order: the served model is the oldest, so it is the first candidate and must be
    # skipped because the mount holds its lock; the idle one is next and goes
    now = time.time()
    for model, age in ((served, 3000), (idle, 2000), (fresh, 0)):
        path = ModelDir(cache, model.source.cache_key).last_used
        path.touch()
        os.utime(path, (now - age, now - age))

    idle_root = ModelDir(cache, idle.source.cache_key).root
    files_at_patch: list[bool] = []
    kube_nodes.on_request.append(
        lambda r: files_at_patch.append(idle_root.exists()) if r.method == "PATCH" else None
    )
    per_model = served_info.total_bytes
    done = run_agent(kube_nodes, tmp_path, cache, "--max-bytes", str(int(per_model * 2.5)))
    assert done.returncode == 0, done.stderr

    assert sorted(p.name for p in models_root(cache).iterdir()) == sorted(
        [served.source.cache_key, fresh.source.cache_key]
    )
    assert files_at_patch and files_at_patch[0] is True  # the label went before the files
    labels = kube_nodes.labels(NODE)
    assert label(idle) not in labels
    assert labels[label(served)] == "ready" and labels[label(fresh)] == "ready"
    assert "in use" in done.stderr
    # the mount still serves its model, byte for byte
    some = served_info.weight_files[0]
    assert sha256_file(mnt / "served" / some) == served_info.files[some].sha256
    assert mount.stop() == 0


def test_once_exits_nonzero_when_the_node_does_not_exist(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    done = run_agent(kube_nodes, tmp_path, tmp_path / "cache")
    assert done.returncode == 1
    assert f"node '{NODE}'" in done.stderr and "404" in done.stderr


def test_loop_follows_the_cache_and_stops_cleanly_on_sigterm(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    import signal

    from tests.fixtures.agent_cache import write_model

    kube_nodes.add_node(NODE)
    cache = tmp_path / "cache"
    env = dict(os.environ, KUBECONFIG=str(kube_nodes.write_kubeconfig(tmp_path / "kubeconfig")))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cmd = [sys.executable, "-m", "sidecar", "agent", "--cache-dir", str(cache), "--node", NODE]
    cmd += ["--interval", "0.2", "--metrics-port", "0"]  # 0: no metrics listener
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        mdir = write_model(cache, "hf://org/later", {"w.bin": b"w" * 10})
        key = LABEL_PREFIX + mdir.key
        deadline = time.monotonic() + 60
        while key not in kube_nodes.labels(NODE):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "label did not appear"
            time.sleep(0.05)
        mdir.manifest.unlink()  # no longer complete: the next pass removes the label
        while key in kube_nodes.labels(NODE):
            assert time.monotonic() < deadline, "label was not removed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopping on signal" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_without_a_cluster_one_clear_error_line(tmp_path: Path) -> None:
    env = dict(os.environ, KUBECONFIG=str(tmp_path / "no-such-kubeconfig"))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cmd = [sys.executable, "-m", "sidecar", "agent", "--cache-dir", str(tmp_path), "--node", NODE]
    done = subprocess.run(
        [*cmd, "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("agent: no cluster to talk to: not in a pod")
    assert "set KUBECONFIG" in line


def test_version_and_help_for_users() -> None:
    run = [sys.executable, "-m", "sidecar"]
    version = subprocess.run(
        [*run, "--version"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False
    )
    assert version.returncode == 0
    assert version.stdout.strip() == f"modelcache {metadata.version('modelcache')}"
    helped = subprocess.run(
        [*run, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False
    )
    for role in ("warmup", "mount", "probe", "agent", "uninstall"):
        assert f"\n  {role} " in helped.stdout


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs: a disk that can be filled in a test."""
    with small_tmpfs(tmp_path / "disk", "16m") as mnt:
        yield mnt


def test_disk_pressure_on_a_real_disk_evicts_until_the_floor(
    tmp_path: Path, kube_nodes: FakeNodeAPI, small_disk: Path
) -> None:
    from tests.fixtures.agent_cache import write_model

    kube_nodes.add_node(NODE)
    cache = small_disk / "cache"
    now = time.time()
    models = [
        write_model(cache, f"hf://org/m{i}", {"w.bin": os.urandom(3 << 20)}, last_used=now - i)
        for i in range(3)
    ]  # 9 MiB of models; m2 is the least recently used, then m1
    (small_disk / "other-data").write_bytes(b"\0" * (5 << 20))  # images, logs: not ours
    # 16 MiB disk, ~2 MiB free; a floor of 40% (6.4 MiB) needs ~4.4 MiB: two models
    done = run_agent(kube_nodes, tmp_path, cache, "--min-free", "40%", "--max-bytes", "0")
    assert done.returncode == 0, done.stderr
    assert "disk pressure" in done.stderr
    left = sorted(p.name for p in models_root(cache).iterdir())
    assert left == [models[0].key]
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize >= 0.4 * st.f_blocks * st.f_frsize
    assert (small_disk / "other-data").exists()  # never touches what is not a model


def test_scraped_metrics_count_real_warmups_hits_misses_and_bytes_saved(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    """Warm-ups as the kubelet runs them (processes), then the agent's /metrics over HTTP."""
    from aiohttp import ClientSession
    from prometheus_client.parser import text_string_to_metric_families

    from sidecar.agent import Agent, AgentSettings, RetryPolicy

    kube_nodes.add_node(NODE)
    cache = tmp_path / "cache"
    info, model = make_model(tmp_path, "llm", seed=7)
    cmd = [sys.executable, "-m", "sidecar", "warmup", "--cache-dir", str(cache)]
    cmd += ["--file-root", str(tmp_path)]  # the test's own model directories
    for args in (
        ["--model", model.to_arg()],  # a miss: everything downloaded
        ["--model", model.to_arg()],  # a hit
        ["--model", f"gone=file://{tmp_path}/no-such-model"],  # not found
    ):
        subprocess.run(
            [*cmd, *args, "--termination-log", str(tmp_path / "tl")],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=120,
            check=False,
        )

    async def scrape() -> str:
        settings = AgentSettings(
            cache_dir=cache,
            node=NODE,
            retry=RetryPolicy(attempts=2, base=0.001, cap=0.01),
            metrics_port=0,
            metrics_host="127.0.0.1",
        )
        agent = Agent(settings, kube_nodes.api_client())
        await agent.start_metrics()
        try:
            assert (await agent.run_pass()).ok
            async with ClientSession() as http, http.get(agent.metrics_url) as resp:
                assert resp.status == 200
                return await resp.text()
        finally:
            await agent.close()

    text = asyncio.run(scrape())
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("modelcache_cache_hits_total", ())] == 1
    assert samples[("modelcache_cache_misses_total", ())] == 1
    assert samples[("modelcache_cache_saved_bytes_total", ())] == info.total_bytes
    assert samples[("modelcache_cache_fetched_bytes_total", ())] == info.total_bytes
    assert samples[("modelcache_warmups_total", (("result", "ok"),))] == 2
    assert samples[("modelcache_warmups_total", (("result", "failed"),))] == 1
    assert samples[("modelcache_warmup_failures_total", (("reason", "not-found"),))] == 1
    assert samples[("modelcache_disk_size_bytes", ())] > 0
    assert (
        0
        < samples[("modelcache_disk_free_bytes", ())]
        <= samples[("modelcache_disk_size_bytes", ())]
    )
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["modelcache_cache_hits"] == "counter"
    assert types["modelcache_disk_free_bytes"] == "gauge"
