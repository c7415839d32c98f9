"""The warm-up planner: include globs, metadata first, weights in natural order."""

from __future__ import annotations

import pytest

from sidecar.sources import RemoteFile
from sidecar.warmup import plan_files


def _files(*paths: str) -> list[RemoteFile]:
    return [RemoteFile(p, 1) for p in paths]


def test_metadata_first_then_weights_in_natural_order() -> None:
    files = _files(
        "model-00010-of-00012.safetensors",
        "model-00002-of-00012.safetensors",
        "shard-10.bin",
        "shard-2.bin",
        "tokenizer.json",
        "model.safetensors.index.json",
        "config.json",
        "README.md",
        "tokenizer.model",
        "merges.txt",
        "generation_config.json",
    )
    order = [f.path for f in plan_files(files, ())]
    assert order[:2] == ["config.json", "model.safetensors.index.json"]
    assert set(order[2:6]) == {
        "tokenizer.json",
        "tokenizer.model",
        "generation_config.json",
        "merges.txt",
    }
    assert order.index("tokenizer.json") < order.index("generation_config.json")
    rest = order[6:]
    assert rest == [
        "README.md",
        "model-00002-of-00012.safetensors",
        "model-00010-of-00012.safetensors",
        "shard-2.bin",
        "shard-10.bin",
    ]


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        ((), {"config.json", "sub/a.safetensors", "b.bin", "sub/tokenizer.json"}),
        (("*.json",), {"config.json", "sub/tokenizer.json"}),
        (("sub/*",), {"sub/a.safetensors", "sub/tokenizer.json"}),
        (("*.safetensors", "config.json"), {"config.json", "sub/a.safetensors"}),
        (("a.safetensors",), {"sub/a.safetensors"}),  # basename match
        (("*.gguf",), set()),
        (("",), {"config.json", "sub/a.safetensors", "b.bin", "sub/tokenizer.json"}),
    ],
)
def test_include_globs_match_path_or_basename(include: tuple[str, ...], expected: set[str]) -> None:
    files = _files("config.json", "sub/a.safetensors", "b.bin", "sub/tokenizer.json")
    assert {f.path for f in plan_files(files, include)} == expected


def test_plan_is_pure_and_keeps_metadata() -> None:
    files = [RemoteFile("b.safetensors", 10, "ab" * 32), RemoteFile("config.json", 2)]
    before = list(files)
    plan = plan_files(files, ())
    assert files == before
    assert plan == [RemoteFile("config.json", 2), RemoteFile("b.safetensors", 10, "ab" * 32)]
