"""What a warm-up tells people, and what it does to the pod, as the kubelet runs it.

Real processes (``python -m sidecar warmup``) against real servers on loopback (nginx, the
fake hub, the fault server): each way a model can be out of reach (not found, unauthorized,
forbidden, unreachable) gets its own actionable message in stderr and in the termination
message file; ``--on-failure continue`` turns it into exit 0; ``@rev`` fetches that revision.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cache import NodeCache
from sidecar.journal import take_records
from sidecar.modelsource import parse_model_arg
from tests.fixtures.modelgen import ModelInfo, generate_model
from tests.fixtures.servers import ServedModel, fake_hf_hub, fault_server

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_outcome_token"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def warmup(
    cache: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], str | None]:
    """Run the warm-up; return the process and the termination message (None: no file)."""
    cmd = [sys.executable, "-m", "sidecar", "warmup", "--cache-dir", str(cache), *args]
    if log is not None:
        cmd += ["--termination-log", str(log)]
        if log.parent.is_dir():
            log.write_text("")  # the kubelet creates the file before the container starts
    res = subprocess.run(
        cmd,
        env=env or _env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    message = log.read_text() if log is not None and log.exists() else None
    return res, message


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServedModel, ModelInfo]]:
    """A hub with ``acme/tiny`` (main and branch ``v1``, different content) and a gated
    ``acme/gated``; a token is required."""
    root = tmp_path_factory.mktemp("hub")
    main = generate_model(root / "acme" / "tiny", total_bytes=1 << 20, shards=2, seed=21)
    v1 = generate_model(
        tmp_path_factory.mktemp("rev") / "tiny-v1", total_bytes=1 << 20, shards=1, seed=22
    )
    generate_model(root / "acme" / "gated", total_bytes=256 << 10, shards=1, seed=23)
    with fake_hf_hub(
        root, token=TOKEN, revisions={"acme/tiny": {"v1": v1.root}}, gated={"acme/gated"}
    ) as server:
        yield ServedModel("hf://acme/tiny", server, main), v1


def test_success_then_cache_hit_in_log_and_termination_message(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    cache, log = tmp_path / "cache", tmp_path / "termination-log"
    arg = f"m={faulty_model.url}"
    first, message = warmup(cache, "--model", arg, log=log)
    assert first.returncode == 0, first.stderr
    assert message is not None and message.startswith("warmup complete: 1 model(s), 8 file(s)")
    assert " downloaded at " in message and "MB/s" in message
    second, message = warmup(cache, "--model", arg, log=log)
    assert second.returncode == 0, second.stderr
    assert message is not None and message.startswith("warmup complete: cache hit: ")
    assert "nothing downloaded" in message and "MB/s" not in message
    assert "MB/s" not in second.stderr  # no "0.0 MB/s" anywhere for a cache hit
    # the node agent counts both runs from the records they left
    records = take_records(cache)
    assert [[m["result"] for m in r["models"]] for r in records] == [["miss"], ["hit"]]
    assert records[1]["models"][0]["cached_bytes"] == faulty_model.info.total_bytes


@pytest.mark.parametrize("server", ["fault-server", "nginx"])
@pytest.mark.parametrize("on_failure", ["fail", "continue"])
def test_not_found(
    tmp_path: Path, request: pytest.FixtureRequest, server: str, on_failure: str
) -> None:
    served: ServedModel = request.getfixturevalue(
        "faulty_model" if server == "fault-server" else "nginx_model"
    )
    url = f"{served.server}no-such-model/"
    log = tmp_path / "log"
    res, message = warmup(
        tmp_path / "cache", "--model", f"m={url}", "--on-failure", on_failure, log=log
    )
    assert res.returncode == (1 if on_failure == "fail" else 0), res.stderr
    line = f"warmup failed: model 'm' ({url}): not found (HTTP 404"
    assert line in res.stderr
    assert "check the URL" in res.stderr
    assert "access denied" not in res.stderr  # a 404 is not reported as a refusal
    assert message is not None and message.startswith(line)
    assert "0 B / 0 B" not in res.stderr + message
    continued = "--on-failure continue: the app starts without the node cache"
    assert (continued in message) is (on_failure == "continue")
    assert (continued in res.stderr) is (on_failure == "continue")
    [record] = take_records(tmp_path / "cache")
    assert record["result"] == "failed" and record["reasons"] == ["not-found"]


@pytest.mark.parametrize("on_failure", ["fail", "continue"])
def test_hub_without_token_is_unauthorized(
    tmp_path: Path, hub: tuple[ServedModel, ModelInfo], on_failure: str
) -> None:
    served, _ = hub
    env = _env(HF_ENDPOINT=served.server.rstrip("/"))
    log = tmp_path / "log"
    res, message = warmup(
        tmp_path / "c", "--model", f"m={served.url}", "--on-failure", on_failure, env=env, log=log
    )
    assert res.returncode == (1 if on_failure == "fail" else 0), res.stderr
    assert "warmup failed: model 'm' (hf://acme/tiny@main): unauthorized (HTTP 401" in res.stderr
    assert "no or invalid token; set HF_TOKEN" in res.stderr
    assert message is not None and "no or invalid token; set HF_TOKEN" in message


def test_gated_hub_model_is_forbidden_with_where_to_ask(
    tmp_path: Path, hub: tuple[ServedModel, ModelInfo]
) -> None:
    served, _ = hub
    env = _env(**served.server.env())
    res, message = warmup(
        tmp_path / "c", "--model", "m=hf://acme/gated", env=env, log=tmp_path / "l"
    )
    assert res.returncode == 1
    assert "warmup failed: model 'm' (hf://acme/gated@main): forbidden (HTTP 403" in res.stderr
    assert f"request access at {served.server.rstrip('/')}/acme/gated" in res.stderr
    assert message is not None and "request access" in message


def test_hub_missing_repo_and_revision_are_not_found(
    tmp_path: Path, hub: tuple[ServedModel, ModelInfo]
) -> None:
    served, _ = hub
    env = _env(**served.server.env())
    res, _ = warmup(
        tmp_path / "c",
        "--model",
        "a=hf://acme/nope",
        "--model",
        "b=hf://acme/tiny@v9",
        env=env,
    )
    assert res.returncode == 1
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("warmup failed: ")]
    assert failed[0].startswith("warmup failed: model 'a' (hf://acme/nope@main): not found")
    assert "no repository acme/nope" in failed[0]
    assert failed[1].startswith("warmup failed: model 'b' (hf://acme/tiny@v9): not found")
    assert "revision 'v9' of acme/tiny does not exist" in failed[1]


@pytest.mark.parametrize("on_failure", ["fail", "continue"])
def test_unreachable_source(tmp_path: Path, on_failure: str) -> None:
    with fault_server(tmp_path) as server:
        url = f"{server}m/"
    # the server is gone: connection refused, no answer at all
    log = tmp_path / "log"
    res, message = warmup(
        tmp_path / "c",
        "--model",
        f"m={url}",
        "--on-failure",
        on_failure,
        log=log,
        env=_env(MODELCACHE_BACKOFF="0.01"),  # 5 retries without the real backoff
    )
    assert res.returncode == (1 if on_failure == "fail" else 0), res.stderr
    assert f"warmup failed: model 'm' ({url}): unreachable (listing /: ClientConnectorError" in (
        res.stderr
    )
    assert "(gave up listing after 5 retries)" in res.stderr
    assert "check the address, DNS" in res.stderr
    assert message is not None and "unreachable" in message


def test_timeout_with_continue_exits_0_and_says_so(
    tmp_path: Path, generated_model: ModelInfo
) -> None:
    with fault_server(generated_model.root.parent) as server:
        server.faults.delay = 0.5  # every 256 KiB chunk waits: 6 MiB take ~12 s per stream
        log = tmp_path / "log"
        res, message = warmup(
            tmp_path / "c",
            "--model",
            f"m={server}{generated_model.root.name}/",
            "--timeout",
            "1",
            "--on-failure",
            "continue",
            log=log,
        )
    assert res.returncode == 0, res.stderr
    assert "timed out after 1s" in res.stderr
    assert message is not None and message.startswith("warmup failed: model 'm'")
    assert "--on-failure continue" in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--on-failure", "maybe"), "argument --on-failure: invalid choice: 'maybe'"),
        (("--on-failure",), "argument --on-failure: expected one argument"),
    ],
)
def test_bad_flags_exit_2_even_with_continue(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    res, _ = warmup(tmp_path / "c", "--model", "m=file:///nowhere", *args)
    assert res.returncode == 2
    assert message in res.stderr
    res, _ = warmup(
        tmp_path / "c", "--model", "no-scheme", "--on-failure", "continue", log=tmp_path / "l"
    )
    assert res.returncode == 2 and "expected NAME=URI" in res.stderr


def test_unwritable_termination_log_is_ignored(tmp_path: Path, faulty_model: ServedModel) -> None:
    res, message = warmup(
        tmp_path / "cache",
        "--model",
        f"m={faulty_model.url}",
        log=tmp_path / "no-such-dir" / "termination-log",
    )
    assert res.returncode == 0, res.stderr
    assert message is None
    assert "Traceback" not in res.stderr


def test_the_termination_log_is_never_created(tmp_path: Path, faulty_model: ServedModel) -> None:
    """Outside a pod (a laptop, the demo) nothing appears at the default /dev path."""
    log = tmp_path / "termination-log"
    cmd = [sys.executable, "-m", "sidecar", "warmup", "--cache-dir", str(tmp_path / "c")]
    res = subprocess.run(
        [*cmd, "--model", f"m={faulty_model.url}", "--termination-log", str(log)],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert not log.exists()


def test_include_typo_warns_in_the_termination_message(
    tmp_path: Path, faulty_model: ServedModel
) -> None:
    log = tmp_path / "log"
    res, message = warmup(
        tmp_path / "c",
        "--model",
        f"m={faulty_model.url}",
        "--include",
        "*.json,*.safetensor",
        log=log,
    )
    assert res.returncode == 0, res.stderr
    assert "--include *.json,*.safetensor selects no weight files" in res.stderr
    assert message is not None
    assert "warmup warning: model 'm': --include *.json,*.safetensor selects no weight" in message


def test_revision_fetches_exactly_that_revision(
    tmp_path: Path, hub: tuple[ServedModel, ModelInfo]
) -> None:
    served, v1 = hub
    env = _env(**served.server.env())
    cache = tmp_path / "cache"
    res, _ = warmup(
        cache, "--model", "main=hf://acme/tiny", "--model", "v1=hf://acme/tiny@v1", env=env
    )
    assert res.returncode == 0, res.stderr
    store = NodeCache(cache)
    mains = store.model_dir(parse_model_arg("main=hf://acme/tiny"))
    v1_dir = store.model_dir(parse_model_arg("v1=hf://acme/tiny@v1"))
    assert mains.root != v1_dir.root  # two revisions, two cache entries
    got_v1 = {
        p.relative_to(v1_dir.data).as_posix(): p.read_bytes()
        for p in v1_dir.data.rglob("*")
        if p.is_file()
    }
    assert {p: (v1.root / p).read_bytes() for p in v1.files} == got_v1
    got_main = {p.relative_to(mains.data).as_posix() for p in mains.data.rglob("*") if p.is_file()}
    assert got_main == set(served.info.files)
    assert got_main != set(got_v1)  # the fixture's revisions differ (2 shards vs 1)
    # files were fetched by the commit of v1 that the listing named, never by a branch name
    manifest = json.loads(v1_dir.manifest.read_text())
    assert manifest["uri"] == "hf://acme/tiny@v1"
    asked = {p.split("/", 1)[0] for p in served.server.stats.per_path}
    v1_commit = hashlib.sha1(b"acme/tiny@v1").hexdigest()  # the fake hub's commit of v1
    main_commit = hashlib.sha1(b"acme/tiny").hexdigest()
    assert asked == {v1_commit, main_commit}


def test_a_cached_private_model_during_an_outage_is_served_only_where_the_cluster_allows(
    tmp_path: Path, hub: tuple[ServedModel, ModelInfo]
) -> None:
    """Off by default: with the hub down, nothing proves the pod may still read the model."""
    served, _ = hub
    cache = tmp_path / "cache"
    arg = f"m={served.url}"
    ok, _ = warmup(cache, "--model", arg, env=_env(HF_ENDPOINT=served.server, HF_TOKEN=TOKEN))
    assert ok.returncode == 0, ok.stderr
    down = _env(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN=TOKEN, MODELCACHE_BACKOFF="0.01")
    refused, _ = warmup(cache, "--model", arg, env=down)
    assert refused.returncode == 1
    assert "unreachable" in refused.stderr
    allowed, _ = warmup(cache, "--model", arg, "--serve-cached-when-unreachable", env=down)
    assert allowed.returncode == 0, allowed.stderr
    assert "serving the complete cached copy (the cluster allows it)" in allowed.stderr


def test_a_pod_without_a_token_never_gets_a_private_model_during_an_outage(
    tmp_path: Path, hub: tuple[ServedModel, ModelInfo]
) -> None:
    """Another tenant fetched the private model with its token; with the hub made unreachable,
    a pod that sends no token must not be served that copy as if it were public."""
    served, _ = hub
    cache = tmp_path / "cache"
    arg = f"m={served.url}"
    ok, _ = warmup(cache, "--model", arg, env=_env(HF_ENDPOINT=served.server, HF_TOKEN=TOKEN))
    assert ok.returncode == 0, ok.stderr
    down = _env(HF_ENDPOINT="http://127.0.0.1:9", MODELCACHE_BACKOFF="0.01")
    refused, _ = warmup(cache, "--model", arg, env=down)
    assert refused.returncode == 1, refused.stderr
    assert "serving the complete cached copy" not in refused.stderr
    assert "unreachable" in refused.stderr
