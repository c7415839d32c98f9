"""The README's annotation table is the one generated from the validation table."""

from __future__ import annotations

from pathlib import Path

from webhook.annotations import ANNOTATIONS, annotation_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_the_generated_table() -> None:
    assert annotation_table_markdown() in README.read_text(encoding="utf-8"), (
        "README.md is out of date: paste webhook.annotations.annotation_table_markdown()"
    )


def test_readme_names_every_key_and_both_quick_start_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert [s.key for s in ANNOTATIONS if f"`{s.key}`" not in text] == []
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick
    assert "make test" in quick
