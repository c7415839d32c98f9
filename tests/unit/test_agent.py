"""Node agent: inventory, label diff, eviction order and its guard, the API retry loop.

The Kubernetes side is the loopback stand-in of ``tests/fixtures/kube_nodes.py`` driven
through the real ``kubernetes`` client.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from sidecar.agent import (
    LABEL_PREFIX,
    Agent,
    AgentSettings,
    ModelState,
    RetryPolicy,
    check_ready,
    label_patch,
    plan_eviction,
    scan_cache,
)
from sidecar.disk import DiskUsage, parse_size
from sidecar.journal import record_warmup
from sidecar.layout import ModelDir
from tests.fixtures.agent_cache import write_model
from tests.fixtures.kube_nodes import FakeNodeAPI

FAST = RetryPolicy(attempts=4, base=0.001, cap=0.01)
NODE = "node-a"
A = "hf://org/alpha"
B = "hf://org/beta"


def key_of(uri: str) -> str:
    from sidecar.modelsource import parse_model_uri

    return parse_model_uri(uri).cache_key


def lab(uri: str) -> str:
    return LABEL_PREFIX + key_of(uri)


def make_agent(
    tmp_path: Path, kube: FakeNodeAPI, max_bytes: int = 0, retry: RetryPolicy = FAST
) -> Agent:
    settings = AgentSettings(cache_dir=tmp_path, node=NODE, max_bytes=max_bytes, retry=retry)
    return Agent(settings, kube.api_client())


# --- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "ready", "expected"),
    [
        ({}, ["k1"], {LABEL_PREFIX + "k1": "ready"}),
        ({LABEL_PREFIX + "k1": "ready"}, ["k1"], {}),
        ({LABEL_PREFIX + "k1": "ready", "gpu": "a100"}, [], {LABEL_PREFIX + "k1": None}),
        ({LABEL_PREFIX + "k1": "stale"}, ["k1"], {LABEL_PREFIX + "k1": "ready"}),
        ({"other.io/k1": "ready", "kubernetes.io/hostname": "n"}, [], {}),
        ({}, ["not a label name!"], {}),
        (
            {LABEL_PREFIX + "gone": "ready"},
            ["k2"],
            {LABEL_PREFIX + "k2": "ready", LABEL_PREFIX + "gone": None},
        ),
    ],
)
def test_label_patch(current: dict[str, str], ready: list[str], expected: dict) -> None:
    assert label_patch(current, ready) == expected


def test_check_ready_reasons(tmp_path: Path) -> None:
    mdir = write_model(tmp_path, A, {"config.json": b"{}", "w/model.bin": b"x" * 100})
    assert check_ready(mdir) == ""
    (mdir.data / "w/model.bin").write_bytes(b"x" * 99)
    assert "99 bytes, manifest says 100" in check_ready(mdir)
    (mdir.data / "w/model.bin").unlink()
    assert "w/model.bin is missing" in check_ready(mdir)
    mdir.manifest.write_text("{not json")
    assert "unreadable manifest" in check_ready(mdir)
    mdir.manifest.write_text(json.dumps({"files": [{"path": "../x", "size": 1}]}))
    assert "unsafe path" in check_ready(mdir)
    mdir.manifest.write_text(json.dumps({"key": "other", "files": []}))
    assert "for key 'other'" in check_ready(mdir)
    mdir.manifest.unlink()
    assert check_ready(mdir) == "no manifest"


def test_scan_counts_partial_bytes_and_lru_time(tmp_path: Path) -> None:
    write_model(tmp_path, A, {"a.bin": b"a" * 1000}, last_used=1_000_000)
    write_model(tmp_path, B, {"b.bin": b"b" * 10}, complete=False, partial={"c.bin": b"c" * 500})
    states = {s.key: s for s in scan_cache(tmp_path)}
    a, b = states[key_of(A)], states[key_of(B)]
    assert a.ready and a.last_used == 1_000_000
    assert a.bytes >= 1000
    assert not b.ready and b.reason == "no manifest"
    assert b.bytes >= 510
    assert scan_cache(tmp_path / "nothing-here") == []


def _state(key: str, size: int, used: float) -> ModelState:
    return ModelState(key=key, path=Path(key), ready=True, bytes=size, last_used=used)


def test_plan_eviction_order() -> None:
    models = [_state("new", 100, 30), _state("old", 100, 10), _state("mid", 100, 20)]
    assert plan_eviction(models, 0) == (0, [])
    assert plan_eviction(models, 300) == (0, [])
    excess, order = plan_eviction(models, 150)
    assert excess == 150
    assert [m.key for m in order] == ["old", "mid", "new"]
    _, order = plan_eviction(models, 150, keep_last={"old"})
    assert [m.key for m in order] == ["mid", "new", "old"]
    # disk pressure: the cache is within its bound (or unbounded) but the disk needs room
    assert plan_eviction(models, 0, need_free=120)[0] == 120
    assert plan_eviction(models, 1000, need_free=120)[0] == 120
    assert plan_eviction(models, 250, need_free=20)[0] == 50  # the larger of the two


@pytest.mark.parametrize(
    ("text", "fs", "expected"),
    [
        ("0", 1000, 0),
        ("1073741824", 0, 1 << 30),
        ("500Gi", 0, 500 << 30),
        ("200G", 0, 200 * 10**9),
        ("1.5Ti", 0, int(1.5 * (1 << 40))),
        ("50%", 1000, 500),
        ("15%", 2000, 300),
        ("0%", 1000, 0),
    ],
)
def test_sizes_parse_and_resolve(text: str, fs: int, expected: int) -> None:
    assert parse_size(text).resolve(fs) == expected


@pytest.mark.parametrize("text", ["", "-5", "12X", "150%", "50 percent", "Gi"])
def test_bad_sizes_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected bytes|between 0% and 100%"):
        parse_size(text)


def test_cli_defaults_are_a_bound_and_a_floor() -> None:
    from sidecar.__main__ import build_parser
    from sidecar.agent import settings_from_args

    args = build_parser().parse_args(["agent", "--cache-dir", "/c", "--node", "n"])
    settings = settings_from_args(args)
    assert settings.max_bytes == parse_size("50%") and settings.min_free == parse_size("15%")
    with pytest.raises(ValueError, match=r"--min-free '5 apples': expected bytes"):
        settings_from_args(
            build_parser().parse_args(
                ["agent", "--cache-dir", "/c", "--node", "n", "--min-free", "5 apples"]
            )
        )


# --- against the API stand-in ---------------------------------------------------------------


async def test_labels_added_removed_and_others_untouched(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(
        NODE, {"gpu": "a100", "other.io/x": "y", LABEL_PREFIX + "gone-123": "ready"}
    )
    write_model(tmp_path, A, {"a.bin": b"a" * 10})
    write_model(tmp_path, B, {"b.bin": b"b"}, complete=False)
    agent = make_agent(tmp_path, kube_nodes)
    result = await agent.run_pass()
    assert result.ok
    assert kube_nodes.labels(NODE) == {"gpu": "a100", "other.io/x": "y", lab(A): "ready"}
    [patch] = kube_nodes.patches()
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {
        "metadata": {"labels": {lab(A): "ready", LABEL_PREFIX + "gone-123": None}}
    }

    # nothing changed: a GET, no PATCH
    kube_nodes.clear_requests()
    assert (await agent.run_pass()).ok
    assert [r.method for r in kube_nodes.recorded()] == ["GET"]

    # a model stops being complete: its label goes, in one patch
    (ModelDir(tmp_path, key_of(A)).data / "a.bin").unlink()
    assert (await agent.run_pass()).ok
    assert kube_nodes.labels(NODE) == {"gpu": "a100", "other.io/x": "y"}
    assert len(kube_nodes.patches()) == 1
    await agent.close()


@pytest.mark.parametrize("fault", ["500", "429", "drop"])
async def test_api_errors_are_retried(tmp_path: Path, kube_nodes: FakeNodeAPI, fault: str) -> None:
    kube_nodes.add_node(NODE)
    write_model(tmp_path, A, {"a.bin": b"a"})
    kube_nodes.fail_next(2, fault, method="PATCH")
    agent = make_agent(tmp_path, kube_nodes)
    result = await agent.run_pass()
    assert result.ok
    assert kube_nodes.labels(NODE) == {lab(A): "ready"}
    statuses = [r.status for r in kube_nodes.patches()]
    assert statuses[-1] == 200 and len(statuses) == 3
    assert "modelcache_label_patch_errors_total 2.0" in agent.metrics.render().decode()
    await agent.close()


async def test_api_unreachable_fails_the_pass_and_once_exits_nonzero(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE)
    kube_nodes.fail_next(100, "500")
    agent = make_agent(tmp_path, kube_nodes)
    result = await agent.run_pass()
    assert not result.ok
    assert "failed 4 times" in result.error and "500" in result.error
    assert await agent.run(once=True) == 1
    await agent.close()


async def test_unknown_node_fails_fast(tmp_path: Path, kube_nodes: FakeNodeAPI) -> None:
    agent = make_agent(tmp_path, kube_nodes, retry=RetryPolicy(attempts=5, base=10, cap=10))
    started = time.monotonic()
    result = await agent.run_pass()
    assert not result.ok and "404" in result.error
    assert len(kube_nodes.recorded()) == 1
    assert time.monotonic() - started < 9  # no backoff wait on a non-retriable answer
    await agent.close()


async def test_eviction_skips_models_in_use_and_unlabels_first(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE, {"gpu": "a100"})
    now = time.time()
    busy = write_model(tmp_path, A, {"a.bin": b"a" * 4000}, last_used=now - 300)
    idle = write_model(tmp_path, B, {"b.bin": b"b" * 4000}, last_used=now - 200)
    fresh = write_model(tmp_path, "hf://org/gamma", {"c.bin": b"c" * 4000}, last_used=now)
    agent = make_agent(tmp_path, kube_nodes)
    assert (await agent.run_pass()).ok  # unbounded: all three labelled
    assert len([k for k in kube_nodes.labels(NODE) if k.startswith(LABEL_PREFIX)]) == 3

    seen_at_patch: list[bool] = []
    kube_nodes.on_request.append(
        lambda r: seen_at_patch.append(idle.root.exists()) if r.method == "PATCH" else None
    )
    fd = os.open(busy.model_lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # as a mount serving the oldest model does
    try:
        bounded = make_agent(tmp_path, kube_nodes, max_bytes=9000)
        result = await bounded.run_pass()
    finally:
        os.close(fd)
    assert result.ok
    assert result.skipped_in_use == [busy.key]
    assert result.evicted == [idle.key]
    assert busy.root.exists() and fresh.root.exists() and not idle.root.exists()
    assert seen_at_patch[0] is True  # the label went while the files were still there
    assert kube_nodes.labels(NODE) == {
        "gpu": "a100",
        lab(A): "ready",
        lab("hf://org/gamma"): "ready",
    }
    assert not any((tmp_path / "trash").iterdir())
    text = bounded.metrics.render().decode()
    assert 'modelcache_evictions_total{reason="size"} 1.0' in text
    assert 'modelcache_evictions_total{reason="disk_pressure"} 0.0' in text
    assert "modelcache_cache_limit_bytes 9000.0" in text
    assert result.eviction_reasons == {idle.key: "size"}
    await agent.close()
    await bounded.close()


async def test_metrics_endpoint_serves_inventory(tmp_path: Path, kube_nodes: FakeNodeAPI) -> None:
    from aiohttp import ClientSession

    kube_nodes.add_node(NODE)
    write_model(tmp_path, A, {"a.bin": b"a" * 100})
    write_model(tmp_path, B, {"b.bin": b"b" * 50}, complete=False)
    settings = AgentSettings(
        cache_dir=tmp_path, node=NODE, retry=FAST, metrics_port=0, metrics_host="127.0.0.1"
    )
    agent = Agent(settings, kube_nodes.api_client())
    await agent.start_metrics()
    try:
        await agent.run_pass()
        async with ClientSession() as http, http.get(agent.metrics_url) as resp:
            assert resp.status == 200
            text = await resp.text()
    finally:
        await agent.close()
    assert 'modelcache_models{state="ready"} 1.0' in text
    assert 'modelcache_models{state="partial"} 1.0' in text
    used = [line for line in text.splitlines() if line.startswith("modelcache_cache_bytes ")]
    assert used and float(used[0].split()[1]) >= 150


# --- pre-warm scheduling (with a stand-in warm function; the real one runs in tests/e2e) ----


class FakeWarm:
    """Records calls and writes the models as a warm-up would (or fails)."""

    def __init__(self, cache_dir: Path, fail: bool = False) -> None:
        self.cache_dir = cache_dir
        self.fail = fail
        self.calls: list[tuple[list[str], dict]] = []

    async def __call__(self, cache: object, models: list, **kwargs: object) -> None:
        self.calls.append(([m.source.uri for m in models], kwargs))
        progress = kwargs["progress"]
        progress.add_total(len(models), 64 * len(models))
        if self.fail:
            raise RuntimeError("source unreachable")
        for m in models:
            write_model(self.cache_dir, m.source.uri, {"w.bin": b"w" * 64})
            progress.add_fetched(64)


def prewarm_agent(
    tmp_path: Path, kube: FakeNodeAPI, config: str, warm: FakeWarm, **kw: object
) -> Agent:
    cfg = tmp_path / "prewarm.yaml"
    cfg.write_text(config)
    cache = tmp_path / "cache"
    settings = AgentSettings(cache_dir=cache, node=NODE, prewarm_config=cfg, retry=FAST, **kw)
    return Agent(settings, kube.api_client(), warm=warm)


async def test_prewarm_runs_on_matching_nodes_when_missing(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE, {"gpu": "a100"})
    warm = FakeWarm(tmp_path / "cache")
    config = f"""
models:
  - model: {A}
    nodeSelector: {{gpu: a100}}
    include: ["*.bin"]
  - model: {B}
    nodeSelector: {{gpu: t4}}
"""
    agent = prewarm_agent(tmp_path, kube_nodes, config, warm)
    assert await agent.run(once=True) == 0
    assert [c[0] for c in warm.calls] == [[A + "@main"]]
    assert warm.calls[0][1]["include"] == ("*.bin",)
    assert kube_nodes.labels(NODE) == {"gpu": "a100", lab(A): "ready"}

    # present now: a later pass starts nothing
    result = await agent.run_pass()
    assert result.started_prewarm == []
    assert len(warm.calls) == 1
    text = agent.metrics.render().decode()
    assert f'modelcache_prewarm_size_bytes{{model="{A}"}} 64.0' in text
    assert f'modelcache_prewarm_bytes_done{{model="{A}"}} 64.0' in text
    assert f'modelcache_prewarm_size_bytes{{model="{B}"}}' not in text  # not for this node
    assert 'modelcache_prewarm_runs_total{result="ok"} 1.0' in text
    assert "modelcache_prewarm_fetched_bytes_total 64.0" in text
    await agent.close()


async def test_prewarm_failure_backs_off_and_once_fails(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE)
    warm = FakeWarm(tmp_path / "cache", fail=True)
    agent = prewarm_agent(tmp_path, kube_nodes, f"models: [{{model: '{A}'}}]", warm)
    assert await agent.run(once=True) == 1
    assert len(warm.calls) == 1
    # within the backoff the next pass does not hammer the source
    assert (await agent.run_pass()).started_prewarm == []
    assert len(warm.calls) == 1
    assert 'modelcache_prewarm_runs_total{result="failed"} 1.0' in agent.metrics.render().decode()
    await agent.close()


async def test_loop_labels_prewarmed_model_without_waiting_an_interval(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    import asyncio

    kube_nodes.add_node(NODE)
    warm = FakeWarm(tmp_path / "cache")
    agent = prewarm_agent(
        tmp_path, kube_nodes, f"models: [{{model: '{A}'}}]", warm, interval=3600.0
    )
    loop_task = asyncio.create_task(agent.run())
    try:
        deadline = time.monotonic() + 20
        while lab(A) not in kube_nodes.labels(NODE):
            assert time.monotonic() < deadline, "label did not appear"
            await asyncio.sleep(0.02)
    finally:
        loop_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop_task
        await agent.close()


async def test_bad_config_on_reload_keeps_the_previous_one(
    tmp_path: Path, kube_nodes: FakeNodeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    kube_nodes.add_node(NODE)
    warm = FakeWarm(tmp_path / "cache")
    agent = prewarm_agent(tmp_path, kube_nodes, f"models: [{{model: '{A}'}}]", warm)
    cfg = tmp_path / "prewarm.yaml"
    cfg.write_text("models: [{model: nope}]")
    os.utime(cfg, (time.time() + 5, time.time() + 5))
    assert await agent.run(once=True) == 0
    assert len(warm.calls) == 1
    assert "models[0].model" in caplog.text and "keeping the previous config" in caplog.text
    await agent.close()


def test_bad_config_at_start_is_an_error_naming_the_key(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    from sidecar.prewarm import PrewarmConfigError

    kube_nodes.add_node(NODE)
    with pytest.raises(PrewarmConfigError, match=r"models\[0\]\.schedul: unknown key"):
        prewarm_agent(
            tmp_path,
            kube_nodes,
            "models: [{model: hf://o/x, schedul: '* * * * *'}]",
            FakeWarm(tmp_path),
        )


async def test_eviction_deletes_nothing_when_the_label_cannot_go(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE)
    old = write_model(tmp_path, A, {"a.bin": b"a" * 4000}, last_used=time.time() - 100)
    write_model(tmp_path, B, {"b.bin": b"b" * 4000})
    assert (await make_agent(tmp_path, kube_nodes).run_pass()).ok
    kube_nodes.fail_next(50, "500", method="PATCH")
    settings = AgentSettings(
        cache_dir=tmp_path, node=NODE, max_bytes=5000, retry=FAST, eviction_retry=FAST
    )
    agent = Agent(settings, kube_nodes.api_client())
    result = await agent.run_pass()
    assert not result.ok and "patch" in result.error
    assert result.evicted == []
    assert old.root.exists() and (old.data / "a.bin").stat().st_size == 4000
    assert kube_nodes.labels(NODE)[lab(A)] == "ready"
    # the lock was released: a mount could take it now
    with agent.cache.hold(old.key, exclusive=True, blocking=False) as got:
        assert got is True
    await agent.close()


async def test_scheduled_prewarm_runs_when_the_cron_minute_passes(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    from datetime import UTC, datetime

    kube_nodes.add_node(NODE)
    warm = FakeWarm(tmp_path / "cache")
    cfg = tmp_path / "prewarm.yaml"
    cfg.write_text(f"models: [{{model: '{A}', schedule: '*/5 * * * *'}}]")
    now = [datetime(2026, 11, 27, 10, 1, tzinfo=UTC)]
    settings = AgentSettings(
        cache_dir=tmp_path / "cache", node=NODE, prewarm_config=cfg, retry=FAST
    )
    agent = Agent(settings, kube_nodes.api_client(), warm=warm, clock=lambda: now[0])
    # a scheduled entry waits for its minute, even when the model is missing
    assert (await agent.run_pass()).started_prewarm == []
    now[0] = datetime(2026, 11, 27, 10, 4, 59, tzinfo=UTC)
    assert (await agent.run_pass()).started_prewarm == []
    now[0] = datetime(2026, 11, 27, 10, 5, 30, tzinfo=UTC)
    assert (await agent.run_pass()).started_prewarm == [A]
    assert await agent.wait_prewarm()
    # the same minute does not fire twice; the next one does, even with the model present
    now[0] = datetime(2026, 11, 27, 10, 9, tzinfo=UTC)
    assert (await agent.run_pass()).started_prewarm == []
    now[0] = datetime(2026, 11, 27, 10, 10, tzinfo=UTC)
    assert (await agent.run_pass()).started_prewarm == [A]
    assert await agent.wait_prewarm()
    assert len(warm.calls) == 2
    await agent.close()


@pytest.mark.parametrize("uri", [A, "s3://bucket/models/llama-3/", "http://10.0.0.1:8080/m/x/"])
def test_the_label_set_is_the_label_the_webhook_asks_for(uri: str) -> None:
    """The agent's label and the webhook's affinity expression must never drift apart."""
    from webhook.mutations.affinity import expression

    key = key_of(uri)
    patch = label_patch({}, [key])
    required = expression(key)
    assert required["operator"] == "In"
    assert patch == {required["key"]: required["values"][0]}


def test_the_api_stand_in_speaks_each_patch_type(kube_nodes: FakeNodeAPI) -> None:
    """The stand-in behaves like the API server where the agent depends on it."""
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    kube_nodes.add_node(NODE, {"a": "1", "b": "2"})
    api = CoreV1Api(kube_nodes.api_client())
    smp = "application/strategic-merge-patch+json"
    api.patch_node(NODE, {"metadata": {"labels": {"a": None, "c": "3"}}}, _content_type=smp)
    assert kube_nodes.labels(NODE) == {"b": "2", "c": "3"}
    api.patch_node(NODE, [{"op": "remove", "path": "/metadata/labels/b"}])  # json-patch
    assert kube_nodes.labels(NODE) == {"c": "3"}
    with pytest.raises(ApiException) as bad:
        api.patch_node(
            NODE, {"metadata": {"labels": {"x/y/z": "v"}}}, _content_type=MERGE_PATCH_TYPE
        )
    assert bad.value.status == 422
    with pytest.raises(ApiException) as missing:
        api.read_node("no-such-node")
    assert missing.value.status == 404
    assert [r.status for r in kube_nodes.recorded()] == [200, 200, 422, 404]


MERGE_PATCH_TYPE = "application/merge-patch+json"


# --- disk pressure, warm-up records, metric names --------------------------------------------


async def test_disk_pressure_evicts_lru_until_the_floor_skipping_models_in_use(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    kube_nodes.add_node(NODE)
    now = time.time()
    busy = write_model(tmp_path, A, {"a.bin": b"a" * 4000}, last_used=now - 300)
    old = write_model(tmp_path, B, {"b.bin": b"b" * 4000}, last_used=now - 200)
    mid = write_model(tmp_path, "hf://org/gamma", {"c.bin": b"c" * 4000}, last_used=now - 100)
    new = write_model(tmp_path, "hf://org/delta", {"d.bin": b"d" * 4000}, last_used=now)
    start = sum(m.bytes for m in scan_cache(tmp_path))

    def disk(_: Path) -> DiskUsage:
        # a 100 kB disk with 8 kB free, plus whatever the agent removed since
        return DiskUsage(
            size=100_000, free=8_000 + start - sum(m.bytes for m in scan_cache(tmp_path))
        )

    settings = AgentSettings(cache_dir=tmp_path, node=NODE, retry=FAST, min_free=parse_size("15%"))
    agent = Agent(settings, kube_nodes.api_client(), disk=disk)
    fd = os.open(busy.model_lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a mount serves the oldest model
    try:
        result = await agent.run_pass()
    finally:
        os.close(fd)
    assert result.ok
    # 15% of 100 kB = 15 kB floor, 8 kB free: 7 kB to free = two 4 kB models, oldest first
    assert result.skipped_in_use == [busy.key]
    assert result.evicted == [old.key, mid.key]
    assert result.eviction_reasons == {old.key: "disk_pressure", mid.key: "disk_pressure"}
    assert busy.root.exists() and new.root.exists()
    assert not old.root.exists() and not mid.root.exists()
    text = agent.metrics.render().decode()
    assert 'modelcache_evictions_total{reason="disk_pressure"} 2.0' in text
    assert 'modelcache_evictions_total{reason="size"} 0.0' in text
    assert "modelcache_disk_min_free_bytes 15000.0" in text
    assert "modelcache_disk_size_bytes 100000.0" in text
    assert "modelcache_disk_free_bytes " in text
    await agent.close()


async def test_no_eviction_above_the_floor(tmp_path: Path, kube_nodes: FakeNodeAPI) -> None:
    kube_nodes.add_node(NODE)
    m = write_model(tmp_path, A, {"a.bin": b"a" * 4000})
    settings = AgentSettings(
        cache_dir=tmp_path,
        node=NODE,
        retry=FAST,
        min_free=parse_size("15%"),
        max_bytes=parse_size("50%"),
    )
    agent = Agent(settings, kube_nodes.api_client(), disk=lambda _: DiskUsage(100_000, 50_000))
    result = await agent.run_pass()
    assert result.ok and result.evicted == [] and m.root.exists()
    assert agent.limit == 50_000 and agent.floor == 15_000
    await agent.close()


async def test_warmup_records_become_hit_miss_and_saved_bytes_counters(
    tmp_path: Path, kube_nodes: FakeNodeAPI
) -> None:
    from sidecar.warmup import Failure, ModelReport, WarmupReport

    kube_nodes.add_node(NODE)
    miss = WarmupReport(models=[ModelReport("m", A, key_of(A), 3, 1000, 1000, ok=True)])
    hit = WarmupReport(models=[ModelReport("m", A, key_of(A), 3, 1000, 0, ok=True)])
    failed = WarmupReport(
        models=[
            ModelReport("m", A, key_of(A), 3, 1000, 0, ok=True),
            ModelReport("x", B, key_of(B)),
        ],
        failures=[Failure("x", B, "not-found", "not found (HTTP 404)")],
    )
    for report in (miss, hit, failed):
        record_warmup(tmp_path, report)
    agent = make_agent(tmp_path, kube_nodes)
    assert (await agent.run_pass()).ok
    text = agent.metrics.render().decode()
    assert "modelcache_cache_hits_total 2.0" in text
    assert "modelcache_cache_misses_total 1.0" in text
    assert "modelcache_cache_saved_bytes_total 2000.0" in text  # bytes not downloaded
    assert "modelcache_cache_fetched_bytes_total 1000.0" in text
    assert 'modelcache_warmups_total{result="ok"} 2.0' in text
    assert 'modelcache_warmups_total{result="failed"} 1.0' in text
    assert 'modelcache_warmup_failures_total{reason="not-found"} 1.0' in text
    # counted once: the records are consumed
    assert (await agent.run_pass()).ok
    assert "modelcache_cache_hits_total 2.0" in agent.metrics.render().decode()
    assert not list((tmp_path / "events").iterdir())
    await agent.close()


def test_no_gauge_is_named_like_a_counter() -> None:
    """Prometheus reserves ``_total`` for counters; a gauge named so misleads rate()."""
    from prometheus_client import CollectorRegistry

    from sidecar.agent import AgentMetrics

    metrics = AgentMetrics(CollectorRegistry())
    for family in metrics.registry.collect():
        if family.type != "counter":
            assert not family.name.endswith("_total"), family.name
            for sample in family.samples:
                assert not sample.name.endswith("_total"), sample.name
