"""warm_models: fills the cache, enforces source access on every run, reports failures."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from sidecar.cache import NodeCache
from sidecar.modelsource import NamedModel, parse_model_arg
from sidecar.progress import Progress
from sidecar.warmup import WarmupError, warm_models
from tests.fixtures.modelgen import ModelInfo, generate_model
from tests.fixtures.servers import ServedModel, fault_server, nginx_server


def _assert_complete(cache: NodeCache, m: NamedModel, info: ModelInfo) -> None:
    md = cache.model_dir(m)
    for path, f in info.files.items():
        assert hashlib.sha256((md.data / path).read_bytes()).hexdigest() == f.sha256, path
    manifest = cache.read_manifest(m)
    assert manifest is not None
    assert {e["path"] for e in manifest["files"]} == set(info.files)
    assert manifest["total_bytes"] == info.total_bytes
    assert cache.is_complete(m)
    assert md.last_used.exists()


def _env(monkeypatch: pytest.MonkeyPatch, served: ServedModel) -> None:
    for k, v in served.server.env().items():
        monkeypatch.setenv(k, v)


async def test_warm_from_nginx_writes_data_then_manifest(
    tmp_path: Path, nginx_model: ServedModel
) -> None:
    cache = NodeCache(tmp_path, part_size=1 << 20)
    m = parse_model_arg(f"llama={nginx_model.url}")
    lines: list[str] = []
    await warm_models(cache, [m], progress=Progress(emit=lines.append))
    _assert_complete(cache, m, nginx_model.info)
    assert json.loads(cache.model_dir(m).source_file.read_text()) == {
        "uri": m.source.uri,
        "key": m.source.cache_key,
    }
    n = len(nginx_model.info.files)
    assert lines[-1].startswith(f"warmup complete: 1 model(s), {n} file(s), 6.0 MiB: 6.0 MiB ")
    assert "downloaded at " in lines[-1] and "0 B from the node cache" in lines[-1]
    # the same models again: a cache hit, said so, with no rate
    again: list[str] = []
    report = await warm_models(cache, [m], progress=Progress(emit=again.append))
    assert again[-1].startswith(
        f"warmup complete: cache hit: 1 model(s), {n} file(s), 6.0 MiB already in the node "
        "cache, nothing downloaded"
    )
    assert "MB/s" not in again[-1]
    assert report.models[0].hit and report.models[0].found_bytes == nginx_model.info.total_bytes


async def test_warm_s3_and_hf(
    tmp_path: Path,
    s3_model: ServedModel,
    hf_model: ServedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _env(monkeypatch, s3_model)
    _env(monkeypatch, hf_model)
    cache = NodeCache(tmp_path)
    base = parse_model_arg(f"base={s3_model.url}")
    lora = parse_model_arg(f"lora={hf_model.url}")
    await warm_models(cache, [base, lora], parallel=4)
    _assert_complete(cache, base, s3_model.info)
    _assert_complete(cache, lora, hf_model.info)
    manifest = cache.read_manifest(lora)
    assert manifest is not None
    shas = {e["path"]: e["sha256"] for e in manifest["files"]}
    for w in hf_model.info.weight_files:
        assert shas[w] == hf_model.info.files[w].sha256  # LFS sha256 recorded and verified


async def test_include_limits_files_and_manifest_keeps_earlier_ones(
    tmp_path: Path, nginx_model: ServedModel
) -> None:
    cache = NodeCache(tmp_path)
    m = parse_model_arg(f"m={nginx_model.url}")
    await warm_models(cache, [m], include=["*.json"])
    manifest = cache.read_manifest(m)
    assert manifest is not None
    assert {e["path"] for e in manifest["files"]} == {
        p for p in nginx_model.info.files if p.endswith(".json")
    }
    await warm_models(cache, [m], include=["*.safetensors"])
    _assert_complete(cache, m, nginx_model.info)


async def test_no_matching_include_is_a_failure(tmp_path: Path, nginx_model: ServedModel) -> None:
    m = parse_model_arg(f"m={nginx_model.url}")
    with pytest.raises(
        WarmupError, match=r"--include \*\.gguf selects none of the 8 file\(s\) .*\.safetensors"
    ) as err:
        await warm_models(NodeCache(tmp_path), [m], include=["*.gguf"])
    assert err.value.kinds == ["no-files"]


async def test_include_without_weights_warns_and_says_what_it_fetched(
    tmp_path: Path, nginx_model: ServedModel, caplog: pytest.LogCaptureFixture
) -> None:
    m = parse_model_arg(f"m={nginx_model.url}")
    lines: list[str] = []
    # the typo of issue reports: *.safetensor selects no weights, only the metadata
    report = await warm_models(
        NodeCache(tmp_path),
        [m],
        include=["*.json", "*.safetensor"],
        progress=Progress(emit=lines.append),
    )
    [warning] = report.warnings
    assert warning.startswith("model 'm': --include *.json,*.safetensor selects no weight files")
    assert "*.safetensors" in warning and "3 weight file(s)" in warning
    assert "check the globs" in warning
    assert warning.split(": ", 1)[1] in caplog.text
    # a glob that selects weights gives no warning
    ok = await warm_models(NodeCache(tmp_path), [m], include=["*.safetensors"])
    assert ok.warnings == []


@pytest.mark.parametrize("broken", ["secret", "key"])
async def test_s3_access_denied_fails_even_with_a_complete_cache(
    tmp_path: Path, s3_model: ServedModel, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    _env(monkeypatch, s3_model)
    cache = NodeCache(tmp_path)
    m = parse_model_arg(f"m={s3_model.url}")
    await warm_models(cache, [m])
    assert cache.is_complete(m)
    monkeypatch.setenv(
        "AWS_SECRET_ACCESS_KEY" if broken == "secret" else "AWS_ACCESS_KEY_ID", "wrong"
    )
    with pytest.raises(
        WarmupError, match=r"model 'm' \(s3://models/tiny-llama/\): unauthorized \(HTTP 403"
    ) as err:
        await warm_models(cache, [m])
    assert err.value.kinds == ["unauthorized"]
    assert "S3 rejects the credentials" in str(err.value)


async def test_hf_missing_token_fails_even_with_a_complete_cache(
    tmp_path: Path, hf_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, hf_model)
    cache = NodeCache(tmp_path)
    m = parse_model_arg(f"m={hf_model.url}")
    await warm_models(cache, [m])
    assert cache.is_complete(m)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(
        WarmupError, match=r"unauthorized \(HTTP 401.*no or invalid token; set HF_TOKEN"
    ):
        await warm_models(cache, [m])


async def test_unreachable_anonymous_source_serves_a_complete_cache(
    tmp_path: Path, generated_model: ModelInfo
) -> None:
    cache = NodeCache(tmp_path / "cache", backoff=0.01, retries=1)
    with fault_server(generated_model.root.parent) as server:
        m = parse_model_arg(f"m={server}{generated_model.root.name}/")
        await warm_models(cache, [m])
    # the server is gone now: connection refused
    await warm_models(cache, [m])
    _assert_complete(cache, m, generated_model)


async def test_unreachable_anonymous_source_with_a_complete_cache_does_not_wait(
    tmp_path: Path, generated_model: ModelInfo
) -> None:
    """No retry backoff when nothing is needed from the source: the pod starts at once."""
    import time

    with fault_server(generated_model.root.parent) as server:
        m = parse_model_arg(f"m={server}{generated_model.root.name}/")
        await warm_models(NodeCache(tmp_path / "cache"), [m])
    slow = NodeCache(tmp_path / "cache", backoff=30, retries=5)  # 15+ minutes of backoff
    started = time.monotonic()
    report = await warm_models(slow, [m])
    assert time.monotonic() - started < 10
    assert report.models[0].hit
    # without a complete copy the same source is retried (and then fails)
    (slow.model_dir(m).manifest).unlink()
    quick = NodeCache(tmp_path / "cache", backoff=0.01, retries=2)
    with pytest.raises(WarmupError, match=r"gave up listing after 2 retries"):
        await warm_models(quick, [m])


async def test_unreachable_source_with_credentials_fails_closed(
    tmp_path: Path, s3_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, s3_model)
    cache = NodeCache(tmp_path, backoff=0.01, retries=1)
    m = parse_model_arg(f"m={s3_model.url}")
    await warm_models(cache, [m])
    with fault_server(tmp_path) as dead:
        dead.faults.status_all = 503
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead.rstrip("/"))
        with pytest.raises(WarmupError, match="503"):
            await warm_models(cache, [m])


async def test_unreachable_source_without_cache_fails(tmp_path: Path) -> None:
    with fault_server(tmp_path) as server:
        url = f"{server}m/"
    m = parse_model_arg(f"m={url}")
    with pytest.raises(
        WarmupError, match=r"unreachable .* \(gave up listing after 1 retries\)"
    ) as err:
        await warm_models(NodeCache(tmp_path / "c", backoff=0.01, retries=1), [m])
    assert err.value.kinds == ["unreachable"]
    assert "check the address, DNS" in str(err.value)


async def test_each_failure_gets_its_own_line(
    tmp_path: Path, nginx_model: ServedModel, generated_model: ModelInfo
) -> None:
    good = parse_model_arg(f"good={nginx_model.url}")
    gone = parse_model_arg(f"gone=file://{tmp_path}/missing")
    denied_root = tmp_path / "denied"
    with fault_server(generated_model.root.parent) as server:
        server.faults.deny = True
        denied = parse_model_arg(f"denied={server}{generated_model.root.name}/")
        cache = NodeCache(tmp_path / "cache")
        with pytest.raises(WarmupError) as err:
            await warm_models(cache, [good, gone, denied], file_roots=[tmp_path])
    assert len(err.value.failures) == 2
    assert err.value.failures[0].startswith("model 'gone' (file://")
    assert "does not exist" in err.value.failures[0]
    assert err.value.failures[1].startswith("model 'denied' (http://")
    assert "forbidden (HTTP 403" in err.value.failures[1]
    assert err.value.kinds == ["not-found", "forbidden"]
    report = err.value.report
    assert report is not None and [r.ok for r in report.models] == [True, False, False]
    assert report.summary().startswith("warmup stopped: 2 of 3 model(s) could not be fetched")
    assert not denied_root.exists()
    _assert_complete(cache, good, nginx_model.info)


async def test_timeout_leaves_a_resumable_partial(tmp_path: Path) -> None:
    info = generate_model(tmp_path / "src" / "m", total_bytes=4 << 20, shards=2, seed=5)
    with nginx_server(tmp_path / "src", limit_rate="256k") as server:
        m = parse_model_arg(f"m={server}m/")
        # nginx sends the first limit_rate bytes of a response at once: 1 MiB parts take ~3 s
        cache = NodeCache(tmp_path / "cache", part_size=1 << 20)
        with pytest.raises(WarmupError, match=r"timed out after 1s .* a rerun resumes") as err:
            await warm_models(cache, [m], timeout=1, parallel=4)
        assert err.value.kinds == ["timeout"]
        assert not cache.is_complete(m)
        assert cache.read_manifest(m) is None
        states = list(cache.model_dir(m).partial_dir.glob("*.json"))
        assert states, "a partial download with resume state stays behind"
    assert info.total_bytes > 4 << 20


def test_progress_line_reports_bytes_rate_eta_files() -> None:
    now = [100.0]
    p = Progress(emit=lambda _: None, clock=lambda: now[0])
    p.add_total(4, 400 << 20)
    p.started = 100.0
    p.add_fetched(100 << 20)
    p.file_done(100 << 20, 100 << 20)
    p.file_done(50 << 20, 0)  # found complete in the cache: counts as done, not as rate
    now[0] = 110.0
    line = p.line()
    assert line.startswith("150.0 MiB / 400.0 MiB (38%), files 2/4, 10.5 MB/s, ETA ")
    assert line.endswith("ETA 25s")


def test_progress_line_without_downloads_shows_no_rate() -> None:
    p = Progress(emit=lambda _: None, clock=lambda: 100.0)
    p.add_total(2, 200)
    assert p.line() == "0 B / 200 B (0%), files 0/2, waiting for the first bytes"
    p.file_done(100, 0)  # complete in the cache (or fetched by another pod on the node)
    assert p.line() == "100 B / 200 B (50%), files 1/2, from the node cache"


async def test_same_size_change_at_the_source_is_fetched_again(tmp_path: Path) -> None:
    src = tmp_path / "src" / "m"
    src.mkdir(parents=True)
    (src / "config.json").write_text('{"v": 1}')
    (src / "w.bin").write_bytes(b"a" * 1000)
    cache = NodeCache(tmp_path / "cache")
    with fault_server(tmp_path / "src") as server:
        m = parse_model_arg(f"m={server}m/")
        await warm_models(cache, [m])
        data = cache.model_dir(m).data
        assert (data / "config.json").read_text() == '{"v": 1}'
        sent = server.stats.bytes_sent
        await warm_models(cache, [m])  # unchanged: nothing fetched
        assert server.stats.bytes_sent == sent
        (src / "config.json").write_text('{"v": 2}')
        os.utime(src / "config.json", (2_000_000_000, 2_000_000_000))
        await warm_models(cache, [m])
        assert (data / "config.json").read_text() == '{"v": 2}'
        assert server.stats.bytes_sent == sent + 8  # only the changed file


async def test_progress_reports_periodically_then_a_final_line() -> None:
    lines: list[str] = []
    two = asyncio.Event()

    def emit(line: str) -> None:
        lines.append(line)
        if len(lines) >= 2:
            two.set()

    p = Progress(interval=0.01, emit=emit)
    p.add_total(1, 10)
    p.start()
    await asyncio.wait_for(two.wait(), 10)
    assert all(ln.startswith("warmup: 0 B / 10 B (0%), files 0/1") for ln in lines)
    p.add_fetched(10)
    p.file_done(10, 10)
    await p.stop("the caller's summary")
    assert lines[-1] == "the caller's summary"


async def test_s3_missing_prefix_and_bucket_are_not_found(
    tmp_path: Path, s3_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, s3_model)
    prefix = parse_model_arg("p=s3://models/no-such-model")
    bucket = parse_model_arg("b=s3://no-such-bucket/m")
    with pytest.raises(WarmupError) as err:
        await warm_models(NodeCache(tmp_path), [prefix, bucket])
    assert err.value.kinds == ["not-found", "not-found"]
    assert "no object under prefix 'no-such-model/' in bucket 'models'" in err.value.failures[0]
    assert "NoSuchBucket" in err.value.failures[1]
    assert "check the bucket and prefix" in err.value.failures[1]
