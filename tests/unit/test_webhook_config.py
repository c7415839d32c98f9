"""webhook.config: defaults, camelCase and snake_case keys, errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from webhook.config import Config, ConfigError, load_config


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.sidecar_image == "ghcr.io/modelcache/sidecar:0.1.0"
    assert cfg.sidecar_mode == "native"
    assert cfg.cache_host_path == "/var/lib/modelcache"
    assert cfg.warmup_timeout == 1800
    assert cfg.on_error == "allow"
    assert cfg.max_request_bytes == 3 * 1024 * 1024
    assert set(cfg.excluded_namespaces) == {"kube-system", "kube-node-lease", "modelcache-system"}
    assert cfg.credentials.s3.keys["AWS_SECRET_ACCESS_KEY"] == "AWS_SECRET_ACCESS_KEY"
    assert cfg.credentials.hf.keys == {"HF_TOKEN": "HF_TOKEN", "HF_ENDPOINT": "HF_ENDPOINT"}
    assert cfg.agent_enabled is False


@pytest.mark.parametrize(
    "text",
    [
        "sidecarImage: r/s:1\nonError: deny\nmaxRequestBytes: 4096\n",
        "sidecar_image: r/s:1\non_error: deny\nmax_request_bytes: 4096\n",
    ],
)
def test_camel_and_snake_case(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert (cfg.sidecar_image, cfg.on_error, cfg.max_request_bytes) == ("r/s:1", "deny", 4096)


def test_nested_credentials(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("credentials:\n  hf:\n    secretName: team-hf\n    keys: {token: HF_TOKEN}\n")
    cfg = load_config(str(path))
    assert cfg.credentials.hf.secret_name == "team-hf"
    assert cfg.credentials.hf.keys == {"token": "HF_TOKEN"}
    assert cfg.credentials.s3.secret_name == "modelcache-s3-credentials"


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(str(path)) == Config()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sidecarImgae: x\n", "sidecarImgae"),
        ("onError: maybe\n", "onError"),
        ("credentials:\n  s3:\n    secretNam: x\n", "credentials.s3"),
        ("cacheHostPath: relative/dir\n", "cacheHostPath"),
        ("warmupTimeout: 0\n", "warmupTimeout"),
        ("- a\n- b\n", "mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.yaml"))


def test_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        Config().on_error = "deny"  # type: ignore[misc]
