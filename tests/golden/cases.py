"""The golden cases: ``cases/<name>.yaml`` and what ``inject`` must make of it.

For each input ``<name>.yaml``: ``<name>.yaml.injected`` is the expected stdout of
``inject`` (absent when the input is denied), ``<name>.warnings`` its stderr (absent when
empty), ``<name>.denied`` the stderr of a denial. A case runs with the default cluster
config unless ``<name>.config`` (a config YAML file) gives its own, e.g. ``nodeCache:
hostPath`` for the legacy pod shape. Regenerate with ``MODELCACHE_UPDATE_GOLDEN=1``
(``make golden``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from webhook.config import Config, load_config

CASES_DIR = Path(__file__).parent / "cases"
SUFFIXES = (".yaml.injected", ".warnings", ".denied", ".config")


@dataclass(frozen=True)
class GoldenCase:
    name: str
    input: str
    #: expected inject stdout; "" when denied
    expected: str
    #: expected stderr lines of a successful inject ("" when none)
    warnings: str
    #: expected stderr of a denial; None when the case is admitted
    denied: str | None
    #: the cluster config of this case (``<name>.config``, else the defaults)
    config: Config = field(default_factory=Config)

    @property
    def path(self) -> Path:
        return CASES_DIR / f"{self.name}.yaml"


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


def load_cases() -> list[GoldenCase]:
    cases = []
    for path in sorted(CASES_DIR.glob("*.yaml")):
        name = path.name.removesuffix(".yaml")
        cases.append(
            GoldenCase(
                name=name,
                input=path.read_text(encoding="utf-8"),
                expected=_read(CASES_DIR / f"{name}.yaml.injected") or "",
                warnings=_read(CASES_DIR / f"{name}.warnings") or "",
                denied=_read(CASES_DIR / f"{name}.denied"),
                config=load_config(
                    str(config) if (config := CASES_DIR / f"{name}.config").exists() else None
                ),
            )
        )
    return cases


def golden_files() -> set[Path]:
    """Every expected-output file present in the cases directory."""
    return {p for s in SUFFIXES for p in CASES_DIR.glob(f"*{s}")}
