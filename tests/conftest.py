"""Root conftest: loads every fixture module under tests/fixtures/ as a pytest plugin.

Each area of the suite keeps its shared fixtures in its own module there (servers, model
generator, pod checks, ...), so adding one never means editing a file another area owns.
"""

from __future__ import annotations

from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)
