"""``examples/``: each Deployment injected by the real CLI passes ``kubernetes-validate
--strict`` (1.29 and 1.37), the API-server rules, and a second inject changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.podcheck import api_server_violations

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")


def inject_cli(
    path: Path | str, stdin: str | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhook", "inject", "-f", str(path), *extra],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_the_four_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"vllm.yaml", "sglang.yaml", "tgi.yaml", "llamacpp.yaml"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_injects_to_a_valid_deployment(example: Path, tmp_path: Path) -> None:
    result = inject_cli(example)
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    template = doc["spec"]["template"]
    names = [c["name"] for c in template["spec"]["initContainers"]]
    assert names[:2] == ["modelcache-warmup", "modelcache-sidecar"]
    assert "modelcache.io/status" in template["metadata"]["annotations"]
    assert api_server_violations(template) == []
    out = tmp_path / "injected.yaml"
    out.write_text(result.stdout)
    for version in ("1.29.0", "1.37.0"):
        check = subprocess.run(
            [str(VALIDATE), "--strict", "-k", version, str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    again = inject_cli("-", result.stdout)
    assert again.returncode == 0
    assert again.stdout == result.stdout


def test_vllm_example_is_detected_and_delivered_in_the_hub_cache() -> None:
    result = inject_cli(ROOT / "examples" / "vllm.yaml")
    pod = yaml.safe_load(result.stdout)["spec"]["template"]["spec"]
    app = next(c for c in pod["containers"] if c["name"] == "vllm")
    assert app["command"] == ["vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct"]
    assert {
        "name": "modelcache-hub",
        "mountPath": "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-1.5B-Instruct",
        "subPath": "models--Qwen--Qwen2.5-1.5B-Instruct",
    } in app["volumeMounts"]
    assert "detected model hf://Qwen/Qwen2.5-1.5B-Instruct" in result.stderr


def test_cli_denial_exits_1_and_prints_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n  annotations:\n"
        "    modelcache.io/warmup: later\nspec:\n  containers:\n  - name: a\n    image: a\n"
    )
    result = inject_cli(bad)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "modelcache.io/warmup: invalid value 'later'" in result.stderr
    assert "accepted: block, async, off" in result.stderr


def test_cli_with_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "sidecarImage: registry.local/sidecar:dev\nnodeCache: hostPath\n"
        "cacheHostPath: /data/cache\n"
    )
    result = inject_cli(ROOT / "examples" / "tgi.yaml", None, "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "registry.local/sidecar:dev" in result.stdout
    assert "path: /data/cache" in result.stdout


def test_cli_reads_the_config_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("nodeCache: hostPath\ncacheHostPath: /data/cache\n")
    monkeypatch.setenv("MODELCACHE_CONFIG", str(cfg))
    assert "path: /data/cache" in inject_cli(ROOT / "examples" / "tgi.yaml").stdout
    # --config wins over the environment
    other = tmp_path / "other.yaml"
    other.write_text("{}\n")
    result = inject_cli(ROOT / "examples" / "tgi.yaml", None, "--config", str(other))
    assert "csi.modelcache.io" in result.stdout and "/data/cache" not in result.stdout
    monkeypatch.setenv("MODELCACHE_CONFIG", str(tmp_path / "missing.yaml"))
    result = inject_cli(ROOT / "examples" / "tgi.yaml")
    assert result.returncode != 0 and "missing.yaml" in result.stderr


def _values(container: dict) -> list[str]:
    out = [*container.get("command", []), *container.get("args", [])]
    out += [e.get("value", "") for e in container.get("env", [])]
    return [str(v) for v in out]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_starts_the_same_without_the_webhook(example: Path) -> None:
    """With the webhook down, pods are created from the manifest as written: it must name the
    model the way the server fetches it by itself, never a path only the webhook provides."""
    doc = yaml.safe_load(example.read_text())
    template = doc["spec"]["template"]
    for container in template["spec"]["containers"]:
        for value in _values(container):
            assert not value.startswith(("/models", "/var/run/modelcache")), (
                container["name"],
                value,
            )
            assert "modelcache" not in value, (container["name"], value)
        for mount in container.get("volumeMounts", []):
            assert not mount["name"].startswith("modelcache-")
    # the model is the one the app names: detected from its args, not only annotated
    assert "modelcache.io/model" not in (template["metadata"].get("annotations") or {})
    result = inject_cli(example)
    assert result.returncode == 0, result.stderr
    assert "detected model hf://" in result.stderr
