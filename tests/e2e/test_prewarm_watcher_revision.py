"""A new revision of an hf:// model downloads only the files that changed: the fetch engine
copies every file whose listed sha256 matches a complete file of another revision of the same
repository in the node cache. Counted at the hub stand-in (bytes it sent), with the real
warm-up executor (``warm_models``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from sidecar.cache import NodeCache, read_file_meta
from sidecar.modelsource import parse_model_arg
from sidecar.warmup import warm_models
from tests.fixtures.modelgen import generate_model
from tests.fixtures.servers import fake_hf_hub

LFS = (".safetensors", ".bin", ".gguf", ".pt", ".model")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_new_revision_fetches_only_changed_files(tmp_path: Path) -> None:
    repos = tmp_path / "hub"
    v1 = repos / "acme" / "llm"
    info = generate_model(v1, total_bytes=3 << 20, shards=3, seed=5)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2)
    changed = info.weight_files[1]
    data = bytearray((v2 / changed).read_bytes())
    data[-100:] = bytes(100)  # a fine-tune touching one shard
    (v2 / changed).write_bytes(bytes(data))
    config = json.loads((v2 / "config.json").read_text())
    (v2 / "config.json").write_text(json.dumps({**config, "revision_note": "v2"}))

    cache = NodeCache(tmp_path / "cache")
    with fake_hf_hub(repos, token="tok", revisions={"acme/llm": {"v2": v2}}) as hub:
        env = hub.env()
        first = await warm_models(cache, [parse_model_arg("llm=hf://acme/llm@main")], env=env)
        assert first.fetched_bytes == info.total_bytes
        sent_before = hub.stats.bytes_sent
        model_v2 = parse_model_arg("llm=hf://acme/llm@v2")
        second = await warm_models(cache, [model_v2], env=env)
        origin_bytes = hub.stats.bytes_sent - sent_before
        per_path = dict(hub.stats.per_path)

    # without a sha256 (config, tokenizer, ...) a file cannot be proven equal: downloaded;
    # weights with a sha256 are downloaded only when that sha256 is new
    no_sha = sum(p.stat().st_size for p in v2.rglob("*") if p.is_file() and p.suffix not in LFS)
    expected = no_sha + (v2 / changed).stat().st_size
    assert origin_bytes == expected
    assert second.fetched_bytes == expected
    assert expected < info.total_bytes // 2
    unchanged = [w for w in info.weight_files if w != changed]
    assert not any(f"v2/{w}" in per_path for w in unchanged)

    md = cache.model_dir(model_v2)
    for p in v2.rglob("*"):
        if p.is_file():
            rel = p.relative_to(v2).as_posix()
            assert _sha(md.data_file(rel)) == _sha(p), rel
    for w in unchanged:
        meta = read_file_meta(md, w)
        assert meta is not None and meta["copied_from"].endswith(w)
        # a copy with its own inode: the v1 file's stamp is untouched
        v1_file = cache.model_dir(parse_model_arg("llm=hf://acme/llm@main")).data_file(w)
        assert md.data_file(w).stat().st_ino != v1_file.stat().st_ino
    assert cache.is_complete(model_v2)


async def test_a_damaged_donor_is_not_copied(tmp_path: Path) -> None:
    """A donor file changed on disk since it was verified (its stamp differs) is not used:
    the file is downloaded instead."""
    repos = tmp_path / "hub"
    v1 = repos / "acme" / "llm"
    info = generate_model(v1, total_bytes=1 << 20, shards=1, seed=6)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2)
    cache = NodeCache(tmp_path / "cache")
    with fake_hf_hub(repos, token="tok", revisions={"acme/llm": {"v2": v2}}) as hub:
        env = hub.env()
        await warm_models(cache, [parse_model_arg("llm=hf://acme/llm@main")], env=env)
        weights = info.weight_files[0]
        donor = cache.model_dir(parse_model_arg("llm=hf://acme/llm@main")).data_file(weights)
        fd = os.open(donor, os.O_WRONLY)
        os.pwrite(fd, b"\0" * 16, 0)
        os.close(fd)
        sent_before = hub.stats.bytes_sent
        model_v2 = parse_model_arg("llm=hf://acme/llm@v2")
        await warm_models(cache, [model_v2], env=env)
        origin_bytes = hub.stats.bytes_sent - sent_before
    assert origin_bytes == info.total_bytes
    assert _sha(cache.model_dir(model_v2).data_file(weights)) == _sha(v2 / weights)
