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


def test_doc_config_block_is_the_default_config() -> None:
    import yaml

    from webhook.config import Config

    text = DOC.read_text(encoding="utf-8")
    block = text.split("## Cluster config", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)
    assert Config.model_validate(data) == Config()
    assert set(data) == {f.alias for f in Config.model_fields.values()}
