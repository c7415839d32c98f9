"""A Hugging Face hub mirror on loopback for the demo, the benchmark and the local-pod tests.

The model itself comes from ``tests.fixtures.modelgen.generate_model`` and nginx from
``tests.fixtures.servers.nginx_server``; what is specific to a mirror lives here.
``publish_hub_repo`` lays a generated model out as static files that answer the documented
Hugging Face Hub endpoints an enterprise hub mirror serves (model info with ``blobs=true``,
the recursive tree listing, and ``resolve``), so an unmodified ``vllm serve org/name`` pod
whose ``huggingface_hub`` client has ``HF_ENDPOINT`` pointing at the mirror, and modelcache's
``hf://`` source, both fetch from it. ``Mirror`` serves that layout (JSON under ``/api/``) and
adds the ``X-Repo-Commit`` header the client needs on ``resolve/<commit>/`` answers (nginx
sends the ``ETag``), and counts the bytes it sent by path, which is how the runner's callers
report bytes fetched. ``NicLimit`` caps the sum of all
connections' bandwidth, like a node's NIC.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

from tests.fixtures.modelgen import ModelInfo
from tests.fixtures.servers import ServerURL, nginx_bytes_sent, nginx_server


def publish_hub_repo(store: Path, repo: str, model: ModelInfo, revision: str = "main") -> str:
    """Serve ``model`` as hub repo ``repo`` from the nginx root ``store``; returns the commit
    id (derived from the files' digests, so a different model is a different commit).
    Weights get an ``lfs.sha256`` (the warm-up verifies it), like on the hub."""
    siblings: list[dict[str, object]] = []
    for rel, f in sorted(model.files.items()):
        sib: dict[str, object] = {"rfilename": rel, "size": f.size}
        if rel.endswith(".safetensors"):
            sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
        siblings.append(sib)
    digests = json.dumps(sorted((rel, f.sha256) for rel, f in model.files.items()))
    commit_id = hashlib.sha1(f"{repo}:{digests}".encode()).hexdigest()
    info = {"id": repo, "modelId": repo, "sha": commit_id, "siblings": siblings}
    # nginx's ETag is "<mtime>-<size>" and huggingface_hub names its blobs after the ETag:
    # two shards of one size and one mtime would become one blob. An mtime derived from the
    # content makes the ETag a content identity, stable across runs.
    for rel, f in model.files.items():
        stamp = (1_600_000_000 + int(f.sha256[:7], 16)) * 1_000_000_000
        os.utime(model.root / rel, ns=(stamp, stamp))
    tree: list[dict[str, object]] = []
    for rel, f in sorted(model.files.items()):
        blob = hashlib.sha1(b"blob %d\0" % f.size + (model.root / rel).read_bytes())
        entry: dict[str, object] = {"type": "file", "oid": blob.hexdigest(), "size": f.size}
        entry["path"] = rel
        if rel.endswith(".safetensors"):
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        tree.append(entry)
    for kind, body in (("revision", info), ("tree", tree)):
        api = store / "api" / "models" / repo / kind
        api.mkdir(parents=True, exist_ok=True)
        for rev in {revision, commit_id}:
            (api / rev).write_text(json.dumps(body))
    resolve = store / repo / "resolve"
    resolve.mkdir(parents=True, exist_ok=True)
    for rev in {revision, commit_id}:
        link = resolve / rev
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(model.root.resolve(), target_is_directory=True)
    return commit_id


_RESOLVE_AT_COMMIT = '~ "^/[^/]+/[^/]+/resolve/(?<hub_commit>[0-9a-f]{40})/"'


class MirrorError(RuntimeError):
    """nginx (or the NIC relay) could not be started."""


class Mirror:
    """nginx serving a hub layout ``root`` on 127.0.0.1; ``with Mirror(root) as m: m.url``.

    The model info files under ``/api/`` have no extension: they are served as JSON, as a
    hub answers."""

    def __init__(self, root: Path, *, limit_rate: str | None = None) -> None:
        self.root = root
        self.limit_rate = limit_rate
        self._stack = contextlib.ExitStack()
        self._server: ServerURL | None = None

    @property
    def server(self) -> ServerURL:
        if self._server is None:
            raise MirrorError("the mirror is not running")
        return self._server

    @property
    def url(self) -> str:
        return str(self.server)

    @property
    def port(self) -> int:
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    def bytes_sent(self, path_contains: str = "") -> int:
        """Body bytes sent so far to requests whose URI contains ``path_contains``:
        ``"/resolve/"`` counts model file bytes only; ``""`` counts everything (listings,
        model info and error pages too)."""
        return nginx_bytes_sent(
            self.server, path_contains=path_contains, files_only=bool(path_contains)
        )

    def start(self) -> Mirror:
        try:
            self._server = self._stack.enter_context(
                nginx_server(
                    self.root,
                    limit_rate=self.limit_rate,
                    locations={
                        "/api/": "default_type application/json;",
                        # huggingface_hub trusts a file answer only with the commit it
                        # belongs to; files are read at a commit (a snapshot's revision)
                        _RESOLVE_AT_COMMIT: "add_header X-Repo-Commit $hub_commit always;",
                    },
                )
            )
        except (OSError, RuntimeError) as exc:
            raise MirrorError(str(exc)) from exc
        return self

    def stop(self) -> None:
        self._stack.close()
        self._server = None

    def __enter__(self) -> Mirror:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_rate(rate: str) -> float:
    """nginx-style rate (``32m``, ``512k``, ``1000000``) in bytes per second."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = rate.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"rate {rate!r}: expected a number with an optional k, m or g") from None


class NicLimit:
    """A loopback TCP relay in front of the mirror that caps the *sum* of all connections'
    download bandwidth, like a node's NIC (nginx's ``limit_rate`` caps each connection only).

    Every chunk sent towards a client reserves its transmission time on one shared virtual
    link (``next_free``), first come first served, so N parallel streams share ``rate``.
    """

    CHUNK = 64 << 10

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.port = 0
        self._next_free = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def _pace(self, n: int) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._next_free = max(now, self._next_free) + n / self.rate
        await asyncio.sleep(self._next_free - now)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, paced: bool
    ) -> None:
        try:
            while chunk := await reader.read(self.CHUNK):
                if paced:
                    await self._pace(len(chunk))
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, paced=False), self._pipe(up_reader, writer, paced=True)
        )

    def start(self) -> NicLimit:
        ready = threading.Event()

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = int(self._server.sockets[0].getsockname()[1])
            ready.set()
            async with self._server:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._server.serve_forever()

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise MirrorError("the NIC-limit relay did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            # closing the server ends serve_forever; open relays end with their sockets
            self._loop.call_soon_threadsafe(self._server.close)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> NicLimit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
