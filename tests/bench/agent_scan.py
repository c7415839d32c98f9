"""How long one node-agent inventory scan takes on a large cache, against a bare walk.

``python -m tests.bench.agent_scan [MODELS] [FILES_PER_MODEL]`` builds a node cache of
MODELS complete models with FILES_PER_MODEL small files each (in a temporary directory),
then times ``scan_cache`` (manifest check + size walk + LRU time of every model) against a
baseline measured in the same run: ``os.walk`` with one ``lstat`` per file over the same tree,
the least any scan that sizes the cache must do. Prints both and their ratio.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from sidecar.agent import scan_cache
from tests.fixtures.agent_cache import write_model


def build(cache: Path, models: int, files: int) -> None:
    for i in range(models):
        write_model(
            cache,
            f"hf://bench/model-{i}",
            {f"shard-{j:05d}.safetensors": b"x" * 64 for j in range(files)},
            last_used=1_000_000 + i,
        )


def baseline(cache: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(cache):
        for name in names:
            total += os.lstat(os.path.join(root, name)).st_size
    return total


def best_of(fn: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str]) -> None:
    models = int(argv[0]) if argv else 200
    files = int(argv[1]) if len(argv) > 1 else 40
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        build(cache, models, files)
        states = scan_cache(cache)
        assert len(states) == models and all(s.ready for s in states)
        walk = best_of(lambda: baseline(cache))
        scan = best_of(lambda: scan_cache(cache))
    print(f"cache: {models} models x {files} files")
    print(f"baseline os.walk+lstat: {walk * 1000:.1f} ms")
    print(f"scan_cache:             {scan * 1000:.1f} ms")
    print(f"ratio scan/baseline:    {scan / walk:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
