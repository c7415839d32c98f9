"""Pre-warm config of the node agent: the cron matcher and the config's error messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.prewarm import (
    CronError,
    CronSchedule,
    PrewarmConfigError,
    load_prewarm_config,
    parse_prewarm_config,
)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "when", "expected"),
    [
        ("* * * * *", "2026-11-27T10:31", True),
        ("*/30 * * * *", "2026-11-27T10:30", True),
        ("*/30 * * * *", "2026-11-27T10:31", False),
        ("0 3 * * *", "2026-11-27T03:00", True),
        ("0 3 * * *", "2026-11-27T04:00", False),
        ("5,10-12 * * * *", "2026-11-27T04:11", True),
        ("5,10-12 * * * *", "2026-11-27T04:13", False),
        ("0-30/10 * * * *", "2026-11-27T04:20", True),
        ("0-30/10 * * * *", "2026-11-27T04:40", False),
        ("0 0 * 12 *", "2026-11-01T00:00", False),
        # 2026-11-27 is a Friday (5); 0 and 7 are both Sunday
        ("0 0 * * 5", "2026-11-27T00:00", True),
        ("0 0 * * 1-4", "2026-11-27T00:00", False),
        ("0 0 * * 7", "2026-11-29T00:00", True),
        ("0 0 * * 0", "2026-11-29T00:00", True),
        # both day fields restricted: either one matching fires (classic cron)
        ("0 0 1 * 5", "2026-11-27T00:00", True),
        ("0 0 1 * 1", "2026-11-27T00:00", False),
        # only day-of-month restricted: day-of-week '*' does not widen it
        ("0 0 1 * *", "2026-11-27T00:00", False),
    ],
)
def test_cron_matches(expr: str, when: str, expected: bool) -> None:
    assert CronSchedule.parse(expr).matches(at(when)) is expected


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * * *", "expected 5 fields"),
        ("60 * * * *", "minute value 60 is outside 0-59"),
        ("* 24 * * *", "hour value 24 is outside 0-23"),
        ("* * 0 * *", "day-of-month value 0 is outside 1-31"),
        ("* * * 13 *", "month value 13 is outside 1-12"),
        ("* * * * 8", "day-of-week value 8 is outside 0-7"),
        ("*/0 * * * *", "minute step value 0"),
        ("5-1 * * * *", "runs backwards"),
        ("mon * * * *", "'mon' is not a number"),
        ("1,,2 * * * *", "empty list item"),
        ("5/2 * * * *", "step needs '*' or a range"),
    ],
)
def test_cron_errors(expr: str, message: str) -> None:
    with pytest.raises(CronError, match="schedule") as info:
        CronSchedule.parse(expr)
    assert message in str(info.value)


def test_fired_between_is_half_open_and_bounded() -> None:
    cron = CronSchedule.parse("30 * * * *")
    assert cron.fired_between(at("2026-11-27T10:29:59"), at("2026-11-27T10:30:00"))
    assert not cron.fired_between(at("2026-11-27T10:30:00"), at("2026-11-27T10:31:00"))
    assert not cron.fired_between(at("2026-11-27T10:31:00"), at("2026-11-27T11:29:59"))
    # a year of downtime is scanned as its last week, which fired
    assert cron.fired_between(at("2025-11-27T10:31:00"), at("2026-11-27T10:00:00"))


def test_config_parses_and_selects_nodes() -> None:
    config = parse_prewarm_config(
        """
models:
  - model: hf://org/llama@v1
    nodeSelector: {gpu: a100}
    include: ["*.json", "*.safetensors"]
    schedule: "*/30 * * * *"
  - model: base=file:///srv/base,lora=file:///srv/lora
"""
    )
    assert [e.model for e in config.for_node({"gpu": "a100"})] == [
        "hf://org/llama@v1",
        "base=file:///srv/base,lora=file:///srv/lora",
    ]
    assert [e.model for e in config.for_node({"gpu": "t4"})] == [
        "base=file:///srv/base,lora=file:///srv/lora"
    ]
    first, second = config.models
    assert first.include == ["*.json", "*.safetensors"]
    assert first.cron is not None and first.cron.expr == "*/30 * * * *"
    assert [m.name for m in second.models] == ["base", "lora"]
    assert second.cron is None
    assert parse_prewarm_config("").models == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [{model: hf://o/x, nodeSelectr: {a: b}}]", "models[0].nodeSelectr: unknown key"),
        ("modles: []", "modles: unknown key (accepted: models)"),
        ("models: [{model: nope}]", "models[0].model: model URI 'nope' has no scheme"),
        ("models: [{include: ['*']}]", "models[0].model: Field required"),
        (
            "models: [{model: hf://o/x}, {model: hf://o/y, schedule: '61 * * * *'}]",
            "models[1].schedule: schedule '61 * * * *': minute value 61",
        ),
        ("models: [{model: hf://o/x, include: '*.json'}]", "models[0].include:"),
        ("models: [{model: hf://o/x, nodeSelector: {gpu: [a]}}]", "models[0].nodeSelector.gpu"),
        ("- hf://o/x", "expected a mapping with a 'models' list"),
        ("models: [", "not valid YAML"),
    ],
)
def test_config_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(PrewarmConfigError) as info:
        parse_prewarm_config(text, "pre-warm config cfg.yaml")
    assert str(info.value).startswith("pre-warm config cfg.yaml: ")
    assert message in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PrewarmConfigError, match="cannot read"):
        load_prewarm_config(tmp_path / "absent.yaml")
