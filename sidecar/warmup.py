"""``python -m sidecar warmup``: fetch every model into the node cache, then exit.

Planner (pure): :func:`plan_files` filters a listing with the ``--include`` globs and orders
it: metadata first (config, tokenizer, index files; what a server reads before weights), then
everything else in natural order (shard 2 before shard 10), so an ``async``-mode server that
starts early finds what it opens first.

Executor (I/O): :func:`warm_models` lists each source with the pod's own credentials
(always, even when the cache is complete: the cache is shared across namespaces and must not
let a pod read a model its credentials cannot), holds the model's shared lock so the agent
never evicts it mid-fill, writes ``source.json`` first and ``manifest.json`` last.

Unreachable source, complete cache: if the listing fails with a *transient* error (network,
5xx) and the model is complete in the cache, an anonymous source (plain http, hub or S3
without credentials in the env) is served from the cache with a warning: nobody's access
control is at stake and the node keeps working through a source outage. A source used with
credentials (``AWS_*`` keys, ``HF_TOKEN``, ``file``/``pvc`` permissions) fails closed: we
cannot prove the pod may still read it. An access error (401/403/404) always fails.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import logging
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from sidecar.cache import PART_SIZE, CacheError, NodeCache
from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_arg
from sidecar.progress import Progress, human_bytes
from sidecar.sources import (
    DEFAULT_PVC_ROOT,
    RemoteFile,
    Source,
    SourceAccessError,
    SourceError,
    SourceUnavailableError,
    open_source,
)

log = logging.getLogger(__name__)

_METADATA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
_DIGITS_RE = re.compile(r"(\d+)")


class WarmupError(Exception):
    """One or more models could not be warmed; ``failures`` has one line per failure."""

    def __init__(self, failures: Sequence[str]) -> None:
        self.failures = list(failures)
        super().__init__("\n".join(self.failures))


def _natural_key(path: str) -> list[tuple[int, int | str]]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in _DIGITS_RE.split(path) if t]


def _metadata_rank(path: str) -> int | None:
    """Order among metadata files (lower first), or None for a data file."""
    name = PurePosixPath(path).name.lower()
    if name == "config.json":
        return 0
    if name.endswith(".index.json"):
        return 1
    if name.startswith("tokenizer") or name.startswith("config"):
        return 2
    if name.endswith(_METADATA_SUFFIXES):
        return 3
    return None


def _matches(path: str, include: Sequence[str]) -> bool:
    name = PurePosixPath(path).name
    return any(fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(name, g) for g in include)


def plan_files(files: list[RemoteFile], include: Sequence[str]) -> list[RemoteFile]:
    """Filter by the globs (path or basename; none = all), metadata first, then natural order."""
    globs = [g for g in include if g]
    chosen = [f for f in files if not globs or _matches(f.path, globs)]

    def key(f: RemoteFile) -> tuple[int, int, list[tuple[int, int | str]]]:
        rank = _metadata_rank(f.path)
        return (0 if rank is not None else 1, rank or 0, _natural_key(f.path))

    return sorted(chosen, key=key)


async def _list_with_retries(cache: NodeCache, src: Source) -> list[RemoteFile]:
    attempt = 0
    while True:
        try:
            return await src.list_files()
        except SourceUnavailableError as exc:
            attempt += 1
            if attempt > cache.retries:
                raise SourceUnavailableError(
                    f"listing failed after {cache.retries} retries: {exc}"
                ) from None
            delay = cache.backoff * 2 ** (attempt - 1)
            log.warning("%s (retry %d/%d in %.1fs)", exc, attempt, cache.retries, delay)
            await asyncio.sleep(delay)


async def _list_model(
    cache: NodeCache, model: NamedModel, src: Source
) -> tuple[list[RemoteFile], bool]:
    """The model's files and whether they come from the cache because the source is down."""
    try:
        files = await _list_with_retries(cache, src)
    except SourceAccessError:
        raise
    except SourceUnavailableError as exc:
        manifest = cache.read_manifest(model)
        if (
            manifest is not None
            and cache.is_complete(model)
            and not getattr(src, "uses_credentials", True)
        ):
            log.warning(
                "%s: source unreachable (%s); serving the complete cached copy "
                "(anonymous source, no access control to enforce)",
                model.name,
                exc,
            )
            return [
                RemoteFile(e["path"], e["size"], e.get("sha256")) for e in manifest["files"]
            ], True
        raise
    if not files:
        raise SourceError(f"{model.source.uri}: the source lists no files")
    return files, False


async def _fill_model(
    cache: NodeCache,
    model: NamedModel,
    src: Source,
    listed: list[RemoteFile],
    plan: list[RemoteFile],
    *,
    parallel: int,
    limiter: asyncio.Semaphore,
    progress: Progress,
) -> None:
    with cache.hold(model):
        cache.prepare_model(model)
        files_sem = asyncio.Semaphore(max(1, parallel))

        async def one(f: RemoteFile) -> None:
            fetched = 0

            def on_bytes(n: int) -> None:
                nonlocal fetched
                fetched += n
                progress.add_fetched(n)

            async with files_sem:
                await cache.ensure_file(
                    model, src, f, parallel=parallel, on_bytes=on_bytes, limiter=limiter
                )
            progress.file_done(f.size, fetched)

        tasks = [asyncio.create_task(one(f)) for f in plan]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # the manifest keeps files an earlier warm-up (other --include) completed, as long
        # as the source still lists them unchanged
        by_path = {f.path: f for f in listed}
        final = {f.path: f for f in plan}
        previous = cache.read_manifest(model)
        for entry in (previous or {}).get("files", []):
            f = by_path.get(entry.get("path", ""))
            if f is not None and f.path not in final and cache.is_file_complete(model, f):
                final[f.path] = f
        files = plan_files(list(final.values()), ())
        old = [
            (e.get("path"), e.get("size"), e.get("sha256"))
            for e in (previous or {}).get("files", [])
        ]
        if not cache.is_complete(model) or old != [(f.path, f.size, f.sha256) for f in files]:
            cache.write_manifest(model, files)
        cache.touch(model)


async def warm_models(
    cache: NodeCache,
    models: Sequence[NamedModel],
    *,
    include: Sequence[str] = (),
    parallel: int = 8,
    timeout: float = 1800,  # noqa: ASYNC109 (the contract: seconds, like --timeout)
    pvc_root: Path | str = DEFAULT_PVC_ROOT,
    progress: Progress | None = None,
) -> None:
    """Fetch every model into ``cache``; raise :class:`WarmupError` listing each failure."""
    progress = progress or Progress()
    failures: list[str] = []
    sources = [open_source(m, pvc_root=pvc_root) for m in models]
    limiter = asyncio.Semaphore(max(1, parallel))

    def fail(m: NamedModel, exc: BaseException) -> None:
        msg = str(exc)
        msg = msg.removeprefix(f"{m.source.uri}: ")  # source errors start with their URI
        failures.append(f"model {m.name!r} ({m.source.uri}): {msg}")

    try:
        async with asyncio.timeout(timeout):
            listings = await asyncio.gather(
                *(_list_model(cache, m, s) for m, s in zip(models, sources, strict=True)),
                return_exceptions=True,
            )
            plans: list[tuple[NamedModel, Source, list[RemoteFile], list[RemoteFile]]] = []
            for m, s, res in zip(models, sources, listings, strict=True):
                if isinstance(res, BaseException):
                    if not isinstance(res, SourceError | CacheError):
                        raise res
                    fail(m, res)
                    continue
                listed, _offline = res
                plan = plan_files(listed, include)
                if not plan:
                    fail(m, SourceError(f"no file matches --include {','.join(include)}"))
                    continue
                progress.add_total(len(plan), sum(f.size for f in plan))
                plans.append((m, s, listed, plan))
            progress.start()
            for m, s, listed, plan in plans:
                try:
                    await _fill_model(
                        cache,
                        m,
                        s,
                        listed,
                        plan,
                        parallel=parallel,
                        limiter=limiter,
                        progress=progress,
                    )
                except (SourceError, CacheError) as exc:
                    fail(m, exc)
    except TimeoutError:
        failures.append(
            f"timed out after {timeout:g}s with {human_bytes(progress.done_bytes)} of "
            f"{human_bytes(progress.total_bytes)} in the cache; a rerun resumes from there"
        )
    finally:
        await progress.stop("failed" if failures else "complete")
        for s in sources:
            await s.aclose()
    if failures:
        raise WarmupError(failures)


def run(args: argparse.Namespace) -> int:
    """The ``warmup`` role: exit 0 when every model is complete and verified."""
    try:
        models = [parse_model_arg(v) for v in args.model]
    except ModelSourceError as exc:
        print(f"warmup failed: {exc}", file=sys.stderr)
        return 2
    names = [m.name for m in models]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        print(f"warmup failed: duplicate --model name(s): {', '.join(dups)}", file=sys.stderr)
        return 2
    if args.parallel < 1 or args.timeout <= 0:
        print("warmup failed: --parallel must be ≥ 1 and --timeout > 0", file=sys.stderr)
        return 2
    include = [g.strip() for g in (args.include or "").split(",") if g.strip()]
    try:
        # tuning knob for tests and benchmarks, not part of the webhook contract
        part_size = int(os.environ.get("MODELCACHE_PART_SIZE") or PART_SIZE)
        cache = NodeCache(args.cache_dir, part_size=part_size)
    except ValueError as exc:
        print(f"warmup failed: MODELCACHE_PART_SIZE: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        # every ranged read writes through a thread, plus hashing and fdatasync: the default
        # pool (cores + 4) would queue writes behind a slow fdatasync on a 2-core node
        pool = ThreadPoolExecutor(max_workers=args.parallel + 4, thread_name_prefix="cache-io")
        asyncio.get_running_loop().set_default_executor(pool)
        await warm_models(
            cache,
            models,
            include=include,
            parallel=args.parallel,
            timeout=args.timeout,
            pvc_root=args.pvc_root,
        )

    try:
        asyncio.run(main())
    except WarmupError as exc:
        for line in exc.failures:
            print(f"warmup failed: {line}", file=sys.stderr)
        return 1
    return 0
