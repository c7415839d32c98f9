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
