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

Outcome (:class:`WarmupReport`): one final line a person can act on, in the log and in the
termination message file that ``kubectl describe pod`` shows: ``cache hit`` when every byte
was already in the node cache, the bytes downloaded and the rate otherwise, and on failure
one line per model naming what failed (``not found``, ``unauthorized``, ``forbidden``,
``unreachable``, ``timed out``) and what to do. ``--on-failure continue`` turns a model that
cannot be fetched into a warning and exit 0, for pods whose app would fetch the model
itself without modelcache (hub-cache delivery): the pod is never worse off than without it.
Every run also leaves a small record in the node cache (``sidecar.journal``) from which the
node agent counts cache hits, misses and the bytes not downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final

from sidecar import journal, nodeclient
from sidecar.cache import BACKOFF, PART_SIZE, CacheError, CacheFullError, NodeCache, pin_holder
from sidecar.layout import ANONYMOUS_MARKER
from sidecar.modelsource import ModelSourceError, NamedModel, parse_model_arg
from sidecar.progress import INTERVAL as PROGRESS_INTERVAL
from sidecar.progress import Progress, human_bytes, human_rate
from sidecar.sources import (
    DEFAULT_PVC_ROOT,
    RemoteFile,
    Source,
    SourceAccessError,
    SourceError,
    SourceNotFoundError,
    SourceUnavailableError,
    open_source,
)

log = logging.getLogger(__name__)

_METADATA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
_DIGITS_RE = re.compile(r"(\d+)")
#: Files that hold weights: an --include that selects none of them is almost surely a typo.
WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
#: Where the kubelet reads a container's termination message (``kubectl describe``).
TERMINATION_LOG: Final = "/dev/termination-log"
#: The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_MAX: Final = 4096
ON_FAILURE_CHOICES: Final = ("fail", "continue")
CONTINUE_NOTE: Final = (
    "warmup: --on-failure continue: the app starts without the node cache for the model(s) "
    "above and fetches them itself, as it would without modelcache"
)


@dataclass(frozen=True)
class Failure:
    """Why one model could not be warmed. ``kind``: not-found, unauthorized, forbidden,
    access-denied, unreachable, unavailable, timeout, no-files, cache, error."""

    model: str
    uri: str
    kind: str
    message: str

    @property
    def line(self) -> str:
        return f"model {self.model!r} ({self.uri}): {self.message}"


@dataclass
class ModelReport:
    """What one model cost: bytes found in the node cache versus downloaded."""

    name: str
    uri: str
    key: str
    files: int = 0
    total_bytes: int = 0
    fetched_bytes: int = 0
    ok: bool = False

    @property
    def hit(self) -> bool:
        """Complete, and every byte was already in the node cache."""
        return self.ok and self.fetched_bytes == 0

    @property
    def found_bytes(self) -> int:
        """Bytes the node cache had: not downloaded by this warm-up."""
        return max(0, self.total_bytes - self.fetched_bytes) if self.ok else 0


@dataclass
class WarmupReport:
    """The outcome of one warm-up: per model, the failures, the warnings, the summary."""

    models: list[ModelReport] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    #: bytes in the node cache and bytes planned when it ended (from the progress counters)
    done_bytes: int = 0
    planned_bytes: int = 0

    @property
    def fetched_bytes(self) -> int:
        return sum(m.fetched_bytes for m in self.models)

    def summary(self) -> str:
        """One line for the log and the termination message."""
        ok = [m for m in self.models if m.ok]
        files = sum(m.files for m in ok)
        total = sum(m.total_bytes for m in ok)
        took = f"in {self.elapsed:.2f}s" if self.elapsed < 10 else f"in {self.elapsed:.0f}s"
        if self.failures:
            done = f", {len(ok)} complete" if ok else ""
            bytes_in = (
                f"; {human_bytes(self.done_bytes)} of {human_bytes(self.planned_bytes)} in the "
                "node cache"
                if self.planned_bytes
                else ""
            )
            return (
                f"warmup stopped: {len(self.failures)} of {len(self.models)} model(s) could not "
                f"be fetched{done}{bytes_in} ({took})"
            )
        what = f"{len(ok)} model(s), {files} file(s), {human_bytes(total)}"
        fetched = self.fetched_bytes
        if fetched == 0:
            return (
                f"warmup complete: cache hit: {what} already in the node cache, nothing "
                f"downloaded ({took})"
            )
        hits = [m.name for m in ok if m.hit]
        hit_note = f"; cache hit for {', '.join(repr(n) for n in hits)}" if hits else ""
        return (
            f"warmup complete: {what}: {human_bytes(fetched)} downloaded at "
            f"{human_rate(fetched, self.elapsed)}, {human_bytes(total - fetched)} from the node "
            f"cache{hit_note} ({took})"
        )

    def message_lines(self, on_failure: str = "fail") -> list[str]:
        """Every line of the final message: summary, failures, warnings, what happens next."""
        lines = [self.summary()]
        lines += [f"warmup failed: {f.line}" for f in self.failures]
        lines += [f"warmup warning: {w}" for w in self.warnings]
        if self.failures and on_failure == "continue":
            lines.append(CONTINUE_NOTE)
        return lines


class WarmupError(Exception):
    """One or more models could not be warmed; ``failures`` has one line per failure."""

    def __init__(
        self, failures: Sequence[Failure | str], report: WarmupReport | None = None
    ) -> None:
        self.problems = [
            f if isinstance(f, Failure) else Failure("", "", "error", f) for f in failures
        ]
        self.failures = [f.line if f.model else f.message for f in self.problems]
        self.report = report
        super().__init__("\n".join(self.failures))

    @property
    def kinds(self) -> list[str]:
        return [f.kind for f in self.problems]


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


def is_weight_file(path: str) -> bool:
    return path.lower().endswith(WEIGHT_SUFFIXES)


def _suffixes(files: Sequence[RemoteFile]) -> str:
    found = sorted({PurePosixPath(f.path).suffix or PurePosixPath(f.path).name for f in files})
    shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
    return shown


def include_problem(
    listed: Sequence[RemoteFile], plan: Sequence[RemoteFile], include: Sequence[str]
) -> str:
    """What is wrong with ``--include`` for this listing, or "" (pure; used for warnings).

    Globs that select nothing, or select no weight file of a model that has weight files
    (``*.safetensor`` for ``*.safetensors``), would fetch a model the app cannot load.
    """
    globs = ",".join(g for g in include if g)
    if not globs:
        return ""
    if not plan:
        return (
            f"--include {globs} selects none of the {len(listed)} file(s) the source lists "
            f"(their types: {_suffixes(listed)}); check the globs"
        )
    weights = [f for f in listed if is_weight_file(f.path)]
    if weights and not any(is_weight_file(f.path) for f in plan):
        chosen = sum(f.size for f in plan)
        kinds = ", ".join("*" + s for s in WEIGHT_SUFFIXES)
        return (
            f"--include {globs} selects no weight files ({kinds}): "
            f"only {len(plan)} file(s), {human_bytes(chosen)}, of a model with "
            f"{len(weights)} weight file(s) (types: {_suffixes(weights)}); check the globs"
        )
    return ""


async def _list_with_retries(
    cache: NodeCache, src: Source, retries: int | None = None
) -> list[RemoteFile]:
    retries = cache.retries if retries is None else retries
    attempt = 0
    while True:
        try:
            return await src.list_files()
        except SourceUnavailableError as exc:
            attempt += 1
            if attempt > retries:
                # the same class: "unreachable" stays unreachable for the message and metrics
                head, _, rest = str(exc).partition(": ")
                raise type(exc)(
                    f"{head}: {rest} (gave up listing after {retries} retries)"
                ) from None
            delay = cache.backoff * 2 ** (attempt - 1)
            log.warning("%s (retry %d/%d in %.1fs)", exc, attempt, retries, delay)
            await asyncio.sleep(delay)


async def _list_model(
    cache: NodeCache, model: NamedModel, src: Source, *, serve_cached: bool = False
) -> tuple[list[RemoteFile], bool]:
    """The model's files and whether they come from the cache because the source is down.

    ``serve_cached``: the cluster lets a complete copy be served while the source is down
    even to a pod that sends credentials (``--serve-cached-when-unreachable``)."""
    # a complete copy of an anonymous source is served at the first failed listing: retries
    # would only delay a pod that needs nothing from the source (a source outage used to
    # cost every such pod ~15 s of backoff before it started)
    anonymous_copy = (
        not getattr(src, "uses_credentials", True)
        and (cache.model_dir(model).root / ANONYMOUS_MARKER).is_file()
    )
    trusted = serve_cached or anonymous_copy
    fallback = trusted and cache.is_complete(model)
    try:
        files = await _list_with_retries(cache, src, retries=0 if fallback else None)
    except SourceAccessError:
        raise
    except SourceUnavailableError as exc:
        manifest = cache.read_manifest(model)
        if manifest is not None and cache.is_complete(model) and trusted:
            log.warning(
                "%s: source unreachable (%s); serving the complete cached copy (%s)",
                model.name,
                exc,
                "the cluster allows it"
                if serve_cached
                else "anonymous source, no access control to enforce",
            )
            return [
                RemoteFile(e["path"], e["size"], e.get("sha256")) for e in manifest["files"]
            ], True
        raise
    if not files:
        raise SourceNotFoundError(
            f"{model.source.uri}: not found (the source lists no files); check the URI"
        )
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
    report: ModelReport,
) -> None:
    with cache.hold(model):
        cache.prepare_model(model)
        files_sem = asyncio.Semaphore(max(1, parallel))

        async def one(f: RemoteFile) -> None:
            fetched = 0

            def on_bytes(n: int) -> None:
                nonlocal fetched
                fetched += n
                report.fetched_bytes += n
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
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if any(isinstance(r, CacheFullError) for r in results):
                # the cancelled files' partials would only keep the disk full
                await asyncio.to_thread(cache.discard_partials, model)
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


def _mark_anonymous(cache: NodeCache, model: NamedModel, src: Source, *, fetched: int) -> None:
    """Record whether the complete copy is readable without credentials (``ANONYMOUS_MARKER``):
    set after a listing and fill with none, cleared when bytes were fetched with credentials."""
    marker = cache.model_dir(model).root / ANONYMOUS_MARKER
    if not getattr(src, "uses_credentials", True):
        with contextlib.suppress(OSError):
            marker.touch()
    elif fetched:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()


async def warm_models(
    cache: NodeCache,
    models: Sequence[NamedModel],
    *,
    include: Sequence[str] = (),
    parallel: int = 8,
    timeout: float = 1800,  # noqa: ASYNC109 (the contract: seconds, like --timeout)
    pvc_root: Path | str = DEFAULT_PVC_ROOT,
    file_roots: Sequence[Path | str] = (),
    progress: Progress | None = None,
    pin: str | None = None,
    env: Mapping[str, str] | None = None,
    serve_cached: bool = False,
    wrap: Callable[[Source, str], Source] | None = None,
) -> WarmupReport:
    """Fetch every model into ``cache`` and return the report; raise :class:`WarmupError`
    (carrying the report) listing each failure.

    ``file://`` models are read only under ``file_roots`` (none: refused), and no local
    source may read the node cache itself. ``pin`` (the pod) pins each model before and
    after filling it, so the agent does not evict it before the pod's sidecar holds it.
    ``env``: where the sources read credentials and endpoints (default ``os.environ``).
    ``wrap``: ``(origin, uri) -> source`` for the node side's fetch settings (peers, see
    ``sidecar.sources.route.wrap_source``); the origin stays the authority for the listing.
    """
    progress = progress or Progress()
    report = WarmupReport(
        models=[ModelReport(m.name, m.source.uri, m.source.cache_key) for m in models]
    )
    started = time.monotonic()
    sources = [
        open_source(
            m,
            pvc_root=pvc_root,
            file_roots=file_roots,
            private_dirs=[cache.cache_dir],
            env=env,
        )
        for m in models
    ]
    if wrap is not None:
        sources = [wrap(s, m.source.uri) for m, s in zip(models, sources, strict=True)]
    limiter = asyncio.Semaphore(max(1, parallel))
    pending = {m.name for m in models}

    def fail(m: NamedModel, exc: BaseException, kind: str | None = None) -> None:
        msg = str(exc)
        msg = msg.removeprefix(f"{m.source.uri}: ")  # source errors start with their URI
        if kind is None:
            kind = exc.kind if isinstance(exc, SourceError) else "cache"
        report.failures.append(Failure(m.name, m.source.uri, kind, msg))
        pending.discard(m.name)

    try:
        async with asyncio.timeout(timeout):
            listings = await asyncio.gather(
                *(
                    _list_model(cache, m, s, serve_cached=serve_cached)
                    for m, s in zip(models, sources, strict=True)
                ),
                return_exceptions=True,
            )
            plans: list[tuple[NamedModel, Source, list[RemoteFile], list[RemoteFile], ModelReport]]
            plans = []
            for m, s, res, mr in zip(models, sources, listings, report.models, strict=True):
                if isinstance(res, BaseException):
                    if not isinstance(res, SourceError | CacheError):
                        raise res
                    fail(m, res)
                    continue
                listed, _offline = res
                plan = plan_files(listed, include)
                problem = include_problem(listed, plan, include)
                if not plan:
                    fail(m, SourceError(problem), "no-files")
                    continue
                if problem:
                    report.warnings.append(f"model {m.name!r}: {problem}")
                    log.warning("model %r: %s", m.name, problem)
                mr.files, mr.total_bytes = len(plan), sum(f.size for f in plan)
                progress.add_total(len(plan), mr.total_bytes)
                plans.append((m, s, listed, plan, mr))
            progress.start()
            for m, s, listed, plan, mr in plans:
                try:
                    if pin:
                        cache.pin(m, pin)
                    await _fill_model(
                        cache,
                        m,
                        s,
                        listed,
                        plan,
                        parallel=parallel,
                        limiter=limiter,
                        progress=progress,
                        report=mr,
                    )
                    if pin:
                        cache.pin(m, pin)  # renewed: a fill may take longer than a pin lasts
                    _mark_anonymous(cache, m, s, fetched=mr.fetched_bytes)
                except (SourceError, CacheError) as exc:
                    fail(m, exc)
                else:
                    mr.ok = True
                    pending.discard(m.name)
    except TimeoutError:
        msg = (
            f"timed out after {timeout:g}s with {human_bytes(progress.done_bytes)} of "
            f"{human_bytes(progress.total_bytes)} in the node cache; a rerun resumes from there"
        )
        for m in models:
            if m.name in pending:
                fail(m, SourceError(msg), "timeout")
    finally:
        report.elapsed = time.monotonic() - started
        report.done_bytes, report.planned_bytes = progress.done_bytes, progress.total_bytes
        await progress.stop()
        progress.emit(report.summary())
        for s in sources:
            await s.aclose()
    if report.failures:
        raise WarmupError(report.failures, report)
    return report


def write_termination_message(path: str, lines: Sequence[str]) -> None:
    """Best effort: the kubelet shows this file as the container's termination message.

    The kubelet creates the file in every container; it is never created here, so a run
    outside a pod leaves nothing in ``/dev``. A missing or unwritable path is ignored: the
    same lines are in the log."""
    data = "\n".join(lines).encode()[:TERMINATION_MESSAGE_MAX]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except OSError:
        return
    try:
        os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)


def _models_of(args: argparse.Namespace) -> list[NamedModel] | None:
    """The ``--model`` values, or None after saying on stderr which one is wrong (a bad
    value, or a name given twice)."""
    try:
        models = [parse_model_arg(v) for v in args.model]
    except ModelSourceError as exc:
        print(f"warmup failed: {exc}", file=sys.stderr)
        return None
    names = [m.name for m in models]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        print(f"warmup failed: duplicate --model name(s): {', '.join(dups)}", file=sys.stderr)
        return None
    return models


def run(args: argparse.Namespace) -> int:
    """The ``warmup`` role: exit 0 when every model is complete and verified (or, with
    ``--on-failure continue``, when the ones that failed are left to the app)."""
    models = _models_of(args)
    if models is None:
        return 2
    if args.parallel < 1 or args.timeout <= 0:
        print("warmup failed: --parallel must be ≥ 1 and --timeout > 0", file=sys.stderr)
        return 2
    include = [g.strip() for g in (args.include or "").split(",") if g.strip()]
    try:
        # tuning knob for tests and benchmarks, not part of the webhook contract
        part_size = int(os.environ.get("MODELCACHE_PART_SIZE") or PART_SIZE)
        backoff = float(os.environ.get("MODELCACHE_BACKOFF") or BACKOFF)
        cache = NodeCache(args.cache_dir, part_size=part_size, backoff=backoff)
    except ValueError as exc:
        print(f"warmup failed: MODELCACHE_PART_SIZE/MODELCACHE_BACKOFF: {exc}", file=sys.stderr)
        return 2

    async def main() -> WarmupReport:
        # every ranged read writes through a thread, plus hashing and fdatasync: the default
        # pool (cores + 4) would queue writes behind a slow fdatasync on a 2-core node
        pool = ThreadPoolExecutor(max_workers=args.parallel + 4, thread_name_prefix="cache-io")
        asyncio.get_running_loop().set_default_executor(pool)
        return await warm_models(
            cache,
            models,
            include=include,
            parallel=args.parallel,
            timeout=args.timeout,
            pvc_root=args.pvc_root,
            file_roots=args.file_root,
            pin=pin_holder(),
            serve_cached=args.serve_cached_when_unreachable,
        )

    try:
        report = asyncio.run(main())
    except WarmupError as exc:
        report = exc.report or WarmupReport(failures=exc.problems)
    journal.record_warmup(cache.cache_dir, report)
    lines = report.message_lines(args.on_failure)
    # failures first in the termination message: the kubelet keeps only its first 4 KiB
    first = [ln for ln in lines if ln.startswith("warmup failed:")]
    write_termination_message(args.termination_log, first + [ln for ln in lines if ln not in first])
    if not report.failures:
        return 0  # the summary and any warning are in the log already
    for line in lines[1:]:
        if not line.startswith("warmup warning:"):
            print(line, file=sys.stderr)
    return 0 if args.on_failure == "continue" else 1


def _node_failure_lines(status: nodeclient.VolumeStatus, timed_out: float | None) -> list[str]:
    """One ``warmup failed:`` line per model that failed (or, on timeout, is not complete)."""
    lines = []
    for m in status.models:
        if m.failed:
            lines.append(f"warmup failed: model {m.name!r} ({m.uri}): {m.error or 'fetch failed'}")
        elif timed_out is not None and not m.complete:
            lines.append(
                f"warmup failed: model {m.name!r} ({m.uri}): timed out after {timed_out:g}s "
                f"with {human_bytes(m.bytes_done)} of {human_bytes(m.bytes_total)} in the node "
                f"cache (state {m.state}); the node keeps fetching, a restart resumes from there"
            )
    return lines


def node_verdict(
    status: nodeclient.VolumeStatus, *, first_look: bool, elapsed: float
) -> tuple[bool, list[str]] | None:
    """``(failed, final lines)`` once the node's status decides the warm-up, None while it
    has to wait (pure). Every model complete: done, a ``cache hit`` when it was so at the
    first look; any model failed: one ``warmup failed:`` line for each, then a summary."""
    if all(m.complete for m in status.models):
        files = sum(len(m.files) for m in status.models)
        total = sum(m.bytes_total or sum(f.size for f in m.files) for m in status.models)
        what = f"{len(status.models)} model(s), {files} file(s), {human_bytes(total)}"
        if first_look:
            line = f"warmup complete: cache hit: {what} already in the node cache"
        else:
            line = f"warmup complete: {what} in the node cache"
        return False, [f"{line} (in {elapsed:.2f}s)"]
    failed = _node_failure_lines(status, None)
    if not failed:
        return None
    summary = (
        f"warmup stopped: {len(failed)} of {len(status.models)} model(s) could not be "
        f"fetched by the node; {human_bytes(status.bytes_done)} of "
        f"{human_bytes(status.bytes_total)} in the node cache"
    )
    return True, [*failed, summary]


def _finish_node(args: argparse.Namespace, lines: list[str], *, failed: bool) -> int:
    """Termination message (failures first), stderr, exit code for node mode."""
    if failed and args.on_failure == "continue":
        lines = [*lines, CONTINUE_NOTE]
    first = [ln for ln in lines if ln.startswith("warmup failed:")]
    write_termination_message(args.termination_log, first + [ln for ln in lines if ln not in first])
    if not failed:
        log.info("%s", lines[0])
        return 0
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return 0 if args.on_failure == "continue" else 1


def run_node(args: argparse.Namespace) -> int:
    """The ``warmup --node-socket`` role: wait until the node plugin has every model of
    this pod complete in the node cache, reading its status through the socket. No cache
    access, no credentials, no privileges."""
    models = _models_of(args)
    if models is None:
        return 2
    names = [m.name for m in models]
    if args.timeout <= 0:
        print("warmup failed: --timeout must be > 0", file=sys.stderr)
        return 2
    started = time.monotonic()
    deadline = started + args.timeout
    socket_path = args.node_socket
    try:
        _fd, status = nodeclient.wait_reachable(socket_path, deadline, on_wait=log.info)
    except nodeclient.NodeStatusError as exc:
        what = "no answer" if isinstance(exc, nodeclient.NodeUnreachableError) else "bad answer"
        return _finish_node(
            args,
            [
                f"warmup failed: {what} from the node plugin within {args.timeout:g}s: {exc}",
                f"warmup stopped: models {', '.join(names)} not known to be in the node cache",
            ],
            failed=True,
        )
    wanted = [(m.name, m.source.uri) for m in models]
    problems = nodeclient.mismatches(status, wanted)
    if problems:
        return _finish_node(
            args,
            [f"warmup failed: {p}" for p in problems]
            + ["warmup stopped: this pod's models and the node plugin's volume differ"],
            failed=True,
        )
    meter = nodeclient.RateMeter()
    first_look = True
    last_line = 0.0
    while True:
        rate = meter.rate(status)
        verdict = node_verdict(status, first_look=first_look, elapsed=time.monotonic() - started)
        if verdict is not None:
            failed, lines = verdict
            return _finish_node(args, lines, failed=failed)
        now = time.monotonic()
        if first_look or now - last_line >= PROGRESS_INTERVAL:
            log.info("warmup: %s", nodeclient.progress_line(status, rate))
            last_line = now
        first_look = False
        if now + nodeclient.WARMUP_POLL > deadline:
            lines = _node_failure_lines(status, args.timeout)
            return _finish_node(
                args, [*lines, f"warmup stopped: timed out after {args.timeout:g}s"], failed=True
            )
        time.sleep(nodeclient.WARMUP_POLL)  # the poll interval; the loop is bounded above
        try:
            _fd, status = nodeclient.wait_reachable(socket_path, deadline, on_wait=log.info)
        except nodeclient.NodeStatusError as exc:
            log.warning("warmup: reading the node status: %s", exc)
            if time.monotonic() + nodeclient.WARMUP_POLL > deadline:
                lines = _node_failure_lines(status, args.timeout)
                return _finish_node(
                    args,
                    [*lines, f"warmup stopped: timed out after {args.timeout:g}s ({exc})"],
                    failed=True,
                )
