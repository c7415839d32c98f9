"""docs/annotations.md lists every annotation exactly as the validation table says."""

from __future__ import annotations

from pathlib import Path

from webhook.annotations import ANNOTATIONS, annotation_table_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "annotations.md"


def test_doc_table_is_the_generated_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert annotation_table_markdown() in text, (
        "docs/annotations.md is out of date: paste webhook.annotations.annotation_table_markdown()"
    )


def test_doc_names_every_key() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [s.key for s in ANNOTATIONS if f"`{s.key}`" not in text]
    assert missing == []
