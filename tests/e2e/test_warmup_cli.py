"""``python -m sidecar warmup`` as the kubelet runs it: real processes, real nginx/S3/hub.

Covers what only separate processes can show: single-flight across 8 concurrent warm-ups
(each byte leaves nginx once), ``kill -9`` mid-download then a rerun that resumes, exit codes
and the one-line-per-failure contract on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cache import NodeCache
from sidecar.modelsource import parse_model_arg
from tests.fixtures.modelgen import ModelInfo, generate_model
from tests.fixtures.servers import (
    ServedModel,
    fault_server,
    nginx_available,
    nginx_bytes_sent,
    nginx_server,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.nginx


def _warmup_cmd(cache: Path, *models: str, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "sidecar", "warmup", "--cache-dir", str(cache)]
    for m in models:
        cmd += ["--model", m]
    return cmd + list(extra)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _run(
    cmd: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def _hashes(cache: Path, uri_arg: str) -> dict[str, str]:
    md = NodeCache(cache).model_dir(parse_model_arg(uri_arg))
    return {
        p.relative_to(md.data).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(md.data.rglob("*"))
        if p.is_file()
    }


def _expected(info: ModelInfo) -> dict[str, str]:
    return {p: f.sha256 for p, f in info.files.items()}


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """A 12 MiB, 4-shard model behind nginx; parts of 1 MiB make many ranged reads."""
    if not nginx_available():
        pytest.skip("nginx not installed (scripts/system-deps.sh installs nginx-light)")
    root = tmp_path_factory.mktemp("e2e-src")
    info = generate_model(root / "m", total_bytes=12 << 20, shards=4, seed=11)
    with nginx_server(root) as server:
        yield ServedModel(f"{server}m/", server, info)


def test_eight_concurrent_warmups_download_each_byte_once(
    tmp_path: Path, big_model: ServedModel
) -> None:
    cache = tmp_path / "cache"
    before = nginx_bytes_sent(big_model.server)
    arg = f"m={big_model.url}"
    env = _env(MODELCACHE_PART_SIZE=str(1 << 20))
    procs = [
        subprocess.Popen(
            _warmup_cmd(cache, arg, extra=("--parallel", "4")),
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    results = [(p.wait(timeout=180), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        if p.stderr:
            p.stderr.close()
    assert [rc for rc, _ in results] == [0] * 8, [err for _, err in results]
    assert nginx_bytes_sent(big_model.server) - before == big_model.info.total_bytes
    assert _hashes(cache, arg) == _expected(big_model.info)
    assert NodeCache(cache).is_complete(parse_model_arg(arg))
    assert all("warmup complete:" in err for _, err in results)


def test_kill_9_then_rerun_resumes_and_completes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    info = generate_model(src / "m", total_bytes=6 << 20, shards=2, seed=12)
    cache = tmp_path / "cache"
    # 1 MiB parts at 512 KiB/s per connection: each part takes about a second
    env = _env(MODELCACHE_PART_SIZE=str(1 << 20))
    with nginx_server(src, limit_rate="512k") as server:
        arg = f"m={server}m/"
        md = NodeCache(cache).model_dir(parse_model_arg(arg))
        proc = subprocess.Popen(
            _warmup_cmd(cache, arg, extra=("--parallel", "2")),
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        done_parts = 0
        while time.monotonic() < deadline and done_parts < 2:
            done_parts = 0
            for state in md.partial_dir.glob("*.json") if md.partial_dir.exists() else []:
                try:
                    done_parts += len(json.loads(state.read_text())["done"])
                except (OSError, ValueError, KeyError):
                    continue
            time.sleep(0.05)  # polling the state file with a deadline
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert done_parts >= 2, "the download never got two parts in"
        assert md.manifest.exists() is False
        visible = {p.name for p in md.data.rglob("*") if p.is_file()}
        for name in visible:  # whatever is visible is complete and correct
            assert hashlib.sha256((md.data / name).read_bytes()).hexdigest() == (
                info.files[name].sha256
            )
        # what the killed run left that a resume may keep: complete files + recorded parts
        kept = sum(info.files[name].size for name in visible)
        for state_file in md.partial_dir.glob("*.json"):
            state = json.loads(state_file.read_text())
            if state["path"] in visible:
                continue  # killed between the rename and removing its state
            kept += sum(
                min(state["part_size"], state["size"] - i * state["part_size"])
                for i in state["done"]
            )
        assert kept >= 1 << 20
        rerun_start = time.time()
        res = _run(_warmup_cmd(cache, arg, extra=("--parallel", "4")), env)
        assert res.returncode == 0, res.stderr
        second = nginx_bytes_sent(server, started_after=rerun_start)
    assert _hashes(cache, arg) == _expected(info)
    # resumed: the rerun fetched only what the killed run had not recorded as written
    assert second == info.total_bytes - kept
    assert "resuming" in res.stderr


def test_access_denied_exits_1_even_with_a_complete_cache(
    tmp_path: Path, s3_model: ServedModel, hf_model: ServedModel
) -> None:
    cache = tmp_path / "cache"
    s3_arg, hf_arg = f"base={s3_model.url}", f"lora={hf_model.url}"
    good = _env(**s3_model.server.env(), **hf_model.server.env())
    ok = _run(_warmup_cmd(cache, s3_arg, hf_arg), good)
    assert ok.returncode == 0, ok.stderr
    bad = dict(good, AWS_SECRET_ACCESS_KEY="wrong")
    del bad["HF_TOKEN"]
    res = _run(_warmup_cmd(cache, s3_arg, hf_arg), bad)
    assert res.returncode == 1
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("warmup failed: ")]
    assert len(failed) == 2, res.stderr
    assert failed[0].startswith(
        "warmup failed: model 'base' (s3://models/tiny-llama/): unauthorized (HTTP 403"
    )
    assert "SignatureDoesNotMatch" in failed[0] and "S3 rejects the credentials" in failed[0]
    assert failed[1].startswith(
        "warmup failed: model 'lora' (hf://acme/tiny-llama@main): unauthorized (HTTP 401"
    )
    assert "no or invalid token; set HF_TOKEN" in failed[1]


def test_unsafe_listing_path_is_refused(tmp_path: Path, generated_model: ModelInfo) -> None:
    with fault_server(generated_model.root.parent) as server:
        server.faults.extra_entries = [
            {"name": "../../etc/cron.d/x", "type": "file", "size": 5, "mtime": ""}
        ]
        # the extra entry goes into the served root listing
        arg = f"m={server}"
        res = _run(_warmup_cmd(tmp_path / "cache", arg), _env())
    assert res.returncode == 1
    assert "refusing unsafe path '../../etc/cron.d/x'" in res.stderr
    assert not (tmp_path / "etc").exists()
    assert not any((tmp_path / "cache").rglob("x"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "no-scheme"), "expected NAME=URI"),
        (("--model", "m=ftp://x/y"), "scheme 'ftp' is not supported"),
        (("--model", "m=file:///a", "--model", "m=file:///b"), "duplicate --model name(s): m"),
        (("--model", "m=file:///a", "--parallel", "0"), "--parallel must be"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    cmd = [sys.executable, "-m", "sidecar", "warmup", "--cache-dir", str(tmp_path), *args]
    res = _run(cmd, _env())
    assert res.returncode == 2
    assert message in res.stderr
    assert not (tmp_path / "models").exists()
