"""The annotation table: every key validated, denials name key, value and accepted values."""

from __future__ import annotations

import pytest

from webhook.annotations import (
    ANNOTATIONS,
    AnnotationError,
    check_inject_label,
    parse_pod_options,
)
from webhook.config import Config

CFG = Config()


def test_defaults_without_annotations() -> None:
    opts = parse_pod_options(None, CFG)
    assert opts.models is None
    assert (opts.warmup, opts.affinity, opts.rewrite, opts.sidecar) == (
        "block",
        "prefer",
        "auto",
        "native",
    )
    assert opts.warmup_timeout == 1800
    assert opts.mount_path == "/models"
    assert opts.include == ()
    assert opts.containers is None


def test_cluster_config_supplies_defaults() -> None:
    cfg = Config(sidecar_mode="classic", warmup_timeout=60, default_mount_path="/llm")
    opts = parse_pod_options({}, cfg)
    assert (opts.sidecar, opts.warmup_timeout, opts.mount_path) == ("classic", 60, "/llm")


@pytest.mark.parametrize(
    ("key", "value", "attr", "expected"),
    [
        ("modelcache.io/warmup", "async", "warmup", "async"),
        ("modelcache.io/warmup", "off", "warmup", "off"),
        ("modelcache.io/warmup-timeout", "600", "warmup_timeout", 600),
        (
            "modelcache.io/warmup-include",
            "*.json, *.safetensors",
            "include",
            ("*.json", "*.safetensors"),
        ),
        ("modelcache.io/affinity", "require", "affinity", "require"),
        ("modelcache.io/rewrite", "off", "rewrite", "off"),
        ("modelcache.io/containers", "app,worker", "containers", ("app", "worker")),
        ("modelcache.io/sidecar", "classic", "sidecar", "classic"),
        ("modelcache.io/mount-path", "/mnt/llm/", "mount_path", "/mnt/llm"),
    ],
)
def test_valid_values(key: str, value: str, attr: str, expected: object) -> None:
    assert getattr(parse_pod_options({key: value}, CFG), attr) == expected


def test_model_list() -> None:
    opts = parse_pod_options({"modelcache.io/model": "a=hf://o/a,b=s3://bkt/b"}, CFG)
    assert opts.models is not None
    assert [(m.name, m.source.uri) for m in opts.models] == [
        ("a", "hf://o/a@main"),
        ("b", "s3://bkt/b/"),
    ]


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("modelcache.io/model", "gs://b/m", "hf://org/name"),
        ("modelcache.io/model", "a=hf://o/a,a=hf://o/b", "name=uri"),
        ("modelcache.io/model", "", "s3://bucket/prefix"),
        ("modelcache.io/warmup", "eager", "block, async, off"),
        ("modelcache.io/warmup-timeout", "0", "1 to 86400"),
        ("modelcache.io/warmup-timeout", "10m", "1 to 86400"),
        ("modelcache.io/warmup-include", "a,,b", "globs"),
        ("modelcache.io/warmup-include", "$(rm -rf /)", "globs"),
        ("modelcache.io/affinity", "always", "prefer, require, off"),
        ("modelcache.io/rewrite", "yes", "auto, path, off"),
        ("modelcache.io/containers", "App_1", "names of containers"),
        ("modelcache.io/sidecar", "ambient", "native, classic"),
        ("modelcache.io/mount-path", "models", "absolute path"),
        ("modelcache.io/mount-path", "/a/../etc", "absolute path"),
        ("modelcache.io/mount-path", "/var/run/modelcache/x", "absolute path"),
        ("modelcache.io/mount-path", "/", "absolute path"),
    ],
)
def test_invalid_values_name_key_value_and_accepted(key: str, value: str, accepted: str) -> None:
    with pytest.raises(AnnotationError) as info:
        parse_pod_options({key: value}, CFG)
    message = str(info.value)
    assert message.startswith(f"{key}: invalid value {value!r}")
    assert accepted in message
    assert info.value.key == key


def test_every_table_key_rejects_a_non_string() -> None:
    for spec in ANNOTATIONS:
        with pytest.raises(AnnotationError, match="not a string"):
            parse_pod_options({spec.key: 3}, CFG)


def test_unknown_key_is_denied() -> None:
    with pytest.raises(AnnotationError) as info:
        parse_pod_options({"modelcache.io/warmpu": "block"}, CFG)
    assert "modelcache.io/warmpu: unknown annotation" in str(info.value)
    assert "modelcache.io/warmup" in str(info.value)


@pytest.mark.parametrize(
    "key",
    ["modelcache.io/status", "modelcache.io/inject", "modelcache.io/injected", "other.io/x"],
)
def test_reserved_and_foreign_keys_are_not_unknown(key: str) -> None:
    parse_pod_options({key: "x", "cache.modelcache.io/abc": "ready"}, CFG)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (None, None),
        ({}, None),
        ({"modelcache.io/inject": "true"}, "true"),
        ({"modelcache.io/inject": "false"}, "false"),
    ],
)
def test_inject_label(labels: object, expected: str | None) -> None:
    assert check_inject_label(labels) == expected


def test_inject_label_bad_value() -> None:
    with pytest.raises(AnnotationError, match=r"modelcache\.io/inject: invalid value 'yes'"):
        check_inject_label({"modelcache.io/inject": "yes"})


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "did you mean hf://Qwen/Qwen2.5-7B-Instruct?"),
        (
            "https://huggingface.co/Qwen/Qwen2.5-7B-Instruct",
            "did you mean hf://Qwen/Qwen2.5-7B-Instruct?",
        ),
        (
            "https://huggingface.co/org/m/tree/v2",
            "did you mean hf://org/m@v2?",
        ),
        ("base=https://hf.co/org/m", "did you mean hf://org/m?"),
    ],
)
def test_model_values_users_write_get_a_did_you_mean(value: str, hint: str) -> None:
    with pytest.raises(AnnotationError) as info:
        parse_pod_options({"modelcache.io/model": value}, CFG)
    assert hint in str(info.value)
    assert "modelcache.io/model" in str(info.value)


def test_a_plain_http_mirror_is_still_accepted() -> None:
    opts = parse_pod_options({"modelcache.io/model": "https://mirror.internal/models/m/"}, CFG)
    assert opts.models is not None and opts.models[0].source.scheme == "https"


@pytest.mark.parametrize(
    "path", ["/tmp", "/var", "/root", "/home", "/opt", "/usr/local/models", "/dev/shm", "/"]
)
def test_mount_path_over_a_directory_apps_rely_on_is_denied(path: str) -> None:
    with pytest.raises(AnnotationError) as info:
        parse_pod_options({"modelcache.io/mount-path": path}, CFG)
    assert "modelcache.io/mount-path" in str(info.value) and repr(path) in str(info.value)


@pytest.mark.parametrize("path", ["/models", "/mnt/models", "/var/models", "/root/models"])
def test_mount_path_beside_them_is_fine(path: str) -> None:
    assert parse_pod_options({"modelcache.io/mount-path": path}, CFG).mount_path == path


def test_file_sources_only_under_the_configured_roots() -> None:
    other_tenant = "file:///var/cache/modelcache/models/org-m-0123456789ab/data"
    with pytest.raises(AnnotationError) as info:
        parse_pod_options({"modelcache.io/model": other_tenant}, CFG)
    assert "outside the allowed roots: none" in str(info.value)
    cfg = Config(file_roots=("/srv/models",))
    opts = parse_pod_options({"modelcache.io/model": "file:///srv/models/m"}, cfg)
    assert opts.models is not None
    with pytest.raises(AnnotationError):
        parse_pod_options({"modelcache.io/model": "file:///srv/models-evil/m"}, cfg)
    with pytest.raises(AnnotationError):
        parse_pod_options({"modelcache.io/model": other_tenant}, cfg)
