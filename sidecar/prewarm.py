"""Pre-warm configuration of the node agent: which models to fetch on which nodes, and when.

The config is a YAML file, normally a mounted ConfigMap, so it is read on every agent pass
and a change applies without a restart::

    models:
      - model: hf://org/name@rev          # or "name=uri,name=uri" as in modelcache.io/model
        nodeSelector: {gpu: a100}         # every label must match; empty = every node
        include: ["*.json", "*.safetensors"]
        schedule: "*/30 * * * *"          # optional; without it: at start and when missing

A typo in a key must not silently turn pre-warming off, so unknown keys are errors and every
error names the entry and key that is wrong. The cron matcher is the classic 5-field one
(minute hour day-of-month month day-of-week; numbers, ``*``, ``*/n``, ``a-b``, ``a-b/n`` and
lists), written here because it is small and no cron library is in the lock file.

Pure apart from :func:`load_prewarm_config` reading the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_spec

#: Longest gap scanned minute by minute when asking whether a schedule fired (one week):
#: an agent that was stopped longer only needs to know "it fired at least once".
_MAX_SCAN: Final = timedelta(days=7)

_FIELDS: Final = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)


class CronError(ValueError):
    """A schedule that is not a valid 5-field cron expression; the message says where."""


class PrewarmConfigError(ValueError):
    """The pre-warm config cannot be used; the message names the file, entry and key."""


def _parse_number(text: str, name: str, low: int, high: int, expr: str) -> int:
    if not text.isdigit():
        raise CronError(f"schedule {expr!r}: {name} value {text!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"schedule {expr!r}: {name} value {value} is outside {low}-{high}")
    return value


def _parse_field(text: str, name: str, low: int, high: int, expr: str) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(f"schedule {expr!r}: {name} has an empty list item")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            step = _parse_number(step_text, f"{name} step", 1, high - low + 1, expr)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _parse_number(first, name, low, high, expr)
            end = _parse_number(last, name, low, high, expr)
            if start > end:
                raise CronError(f"schedule {expr!r}: {name} range {base!r} runs backwards")
        else:
            start = _parse_number(base, name, low, high, expr)
            if slash:
                raise CronError(
                    f"schedule {expr!r}: {name} step needs '*' or a range, not {item!r}"
                )
            end = start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed 5-field cron expression, matched in UTC minutes."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday (7 is folded into 0)
    day_restricted: bool
    weekday_restricted: bool

    @classmethod
    def parse(cls, expr: str) -> CronSchedule:
        fields = expr.split()
        if len(fields) != 5:
            raise CronError(
                f"schedule {expr!r}: expected 5 fields (minute hour day-of-month month "
                f"day-of-week), got {len(fields)}"
            )
        parsed = [
            _parse_field(text, name, low, high, expr)
            for text, (name, low, high) in zip(fields, _FIELDS, strict=True)
        ]
        weekdays = frozenset(d % 7 for d in parsed[4])
        # classic cron: when both day fields are restricted, a day matching either one fires
        return cls(
            expr=expr,
            minutes=parsed[0],
            hours=parsed[1],
            days=parsed[2],
            months=parsed[3],
            weekdays=weekdays,
            day_restricted=not fields[2].startswith("*"),
            weekday_restricted=not fields[4].startswith("*"),
        )

    def matches(self, when: datetime) -> bool:
        if when.minute not in self.minutes or when.hour not in self.hours:
            return False
        if when.month not in self.months:
            return False
        day_ok = when.day in self.days
        weekday_ok = (when.weekday() + 1) % 7 in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def fired_between(self, since: datetime, until: datetime) -> bool:
        """Whether some whole minute in ``(since, until]`` matches."""
        since = max(since, until - _MAX_SCAN)
        minute = since.replace(second=0, microsecond=0) + timedelta(minutes=1)
        while minute <= until:
            if self.matches(minute):
                return True
            minute += timedelta(minutes=1)
        return False


class PrewarmEntry(BaseModel):
    """One ``models:`` entry of the pre-warm config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    include: list[str] = Field(default_factory=list)
    schedule: str | None = None

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        try:
            parse_model_spec(value)
        except ModelSourceError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("include")
    @classmethod
    def _check_include(cls, value: list[str]) -> list[str]:
        if any(not glob.strip() for glob in value):
            raise ValueError("include has an empty glob")
        return value

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                CronSchedule.parse(value)
            except CronError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @property
    def models(self) -> list[NamedModel]:
        return parse_model_spec(self.model)

    @property
    def cron(self) -> CronSchedule | None:
        return CronSchedule.parse(self.schedule) if self.schedule else None

    @property
    def ident(self) -> str:
        """Stable identity across config reloads: same text, same entry."""
        return self.model_dump_json(by_alias=True)

    def selects(self, node_labels: Mapping[str, str]) -> bool:
        return all(node_labels.get(k) == v for k, v in self.node_selector.items())


class PrewarmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[PrewarmEntry] = Field(default_factory=list)

    def for_node(self, node_labels: Mapping[str, str]) -> list[PrewarmEntry]:
        return [e for e in self.models if e.selects(node_labels)]


_ACCEPTED: Final = {
    (): "models",
    ("models", "*"): "model, nodeSelector, include, schedule",
}


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _format_error(err: Mapping[str, Any]) -> str:
    loc = tuple(err["loc"])
    where = _format_loc(loc)
    if err["type"] == "extra_forbidden":
        parent = tuple("*" if isinstance(p, int) else p for p in loc[:-1])
        accepted = _ACCEPTED.get(parent)
        hint = f" (accepted: {accepted})" if accepted else ""
        return f"{where}: unknown key{hint}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}"


def parse_prewarm_config(text: str, source: str = "pre-warm config") -> PrewarmConfig:
    """Parse the YAML text; raise :class:`PrewarmConfigError` naming every bad key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PrewarmConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        return PrewarmConfig()
    if not isinstance(data, dict):
        raise PrewarmConfigError(
            f"{source}: expected a mapping with a 'models' list, got {type(data).__name__}"
        )
    try:
        return PrewarmConfig.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(_format_error(e) for e in exc.errors())
        raise PrewarmConfigError(f"{source}: {details}") from None


def load_prewarm_config(path: Path | str) -> PrewarmConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PrewarmConfigError(f"pre-warm config {path}: cannot read: {exc}") from exc
    return parse_prewarm_config(text, f"pre-warm config {path}")
