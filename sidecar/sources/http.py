"""``http(s)://host/dir/``: a directory tree served with nginx's JSON autoindex.

``autoindex_format json`` lists ``[{"name", "type": "file"|"directory", "mtime", "size"}]``;
directories are walked recursively. Bytes come from ranged GETs whose ``Content-Range`` is
checked, and the ``ETag`` of a file must not change while we read it (a file replaced at
the source mid-download would otherwise be stitched from two versions).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
from yarl import URL

from sidecar.layout import UnsafePathError, safe_relpath
from sidecar.sources import (
    RemoteFile,
    SourceAccessError,
    SourceError,
    SourceForbiddenError,
    SourceNotFoundError,
    SourceUnauthorizedError,
)
from sidecar.sources._http import HttpClient


def _advice(status: int, code: str, body: str) -> tuple[type[SourceAccessError], str]:
    if status == 404:
        return SourceNotFoundError, (
            "check the URL: it names a directory (ending in /) served with a JSON autoindex"
        )
    if status == 401:
        return SourceUnauthorizedError, (
            "the server asks for credentials, and http(s) sources are read without any; "
            "serve the model without authentication inside the cluster, or use s3:// or hf://"
        )
    return SourceForbiddenError, "the server refuses access; check its access rules"


_MAX_ENTRIES = 100_000


class HttpSource:
    """A model directory behind an nginx JSON autoindex."""

    uses_credentials = False  # no credential env vars exist for plain http(s)

    def __init__(self, base_url: str, *, read_timeout: float) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.http = HttpClient(self.base_url, read_timeout=read_timeout, advice=_advice)
        self._versions: dict[str, str] = {}
        self._etags: dict[str, str] = {}

    def _url(self, relpath: str) -> URL:
        return URL(self.base_url + quote(relpath, safe="/"), encoded=True)

    async def list_files(self) -> list[RemoteFile]:
        files: list[RemoteFile] = []
        pending = [""]
        while pending:
            rel_dir = pending.pop(0)
            body, _ = await self.http.get_bytes(self._url(rel_dir), f"listing /{rel_dir}")
            try:
                entries = json.loads(body)
            except ValueError:
                raise SourceError(
                    f"{self.base_url}: /{rel_dir} is not an nginx JSON autoindex listing "
                    "(is `autoindex on; autoindex_format json;` set?)"
                ) from None
            if not isinstance(entries, list):
                raise SourceError(f"{self.base_url}: /{rel_dir}: listing is not a JSON array")
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    raise SourceError(f"{self.base_url}: /{rel_dir}: malformed entry {entry!r}")
                name = entry["name"]
                if "/" in name:
                    raise SourceError(
                        f"{self.base_url}: refusing unsafe path {name!r} in listing /{rel_dir}"
                    )
                try:
                    path = safe_relpath(rel_dir + name)
                except UnsafePathError as exc:
                    raise SourceError(f"{self.base_url}: {exc}") from None
                kind = entry.get("type")
                if kind == "directory":
                    pending.append(path + "/")
                elif kind == "file":
                    size = entry.get("size")
                    if not isinstance(size, int) or size < 0:
                        raise SourceError(f"{self.base_url}: {path}: listing has no valid size")
                    self._versions[path] = f"{size}-{entry.get('mtime', '')}"
                    files.append(RemoteFile(path, size))
                if len(files) + len(pending) > _MAX_ENTRIES:
                    raise SourceError(f"{self.base_url}: more than {_MAX_ENTRIES} entries")
        return files

    def version(self, path: str) -> str | None:
        return self._versions.get(path)

    def download_target(self, path: str) -> tuple[str, dict[str, str]]:
        """The URL of a listed file and the headers a download needs (for a node-level
        downloader such as Dragonfly's daemon, which fetches it back-to-source)."""
        return str(self._url(safe_relpath(path))), {}

    def _check_etag(self, path: str, resp: aiohttp.ClientResponse) -> None:
        etag = resp.headers.get("ETag")
        if not etag:
            return
        seen = self._etags.setdefault(path, etag)
        if seen != etag:
            raise SourceError(
                f"{self.base_url}: {path} changed at the source while downloading "
                f"(ETag {seen} → {etag})"
            )

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        async for chunk in self.http.stream_range(
            self._url(path),
            path,
            start,
            end,
            on_response=lambda resp: self._check_etag(path, resp),
        ):
            yield chunk

    async def aclose(self) -> None:
        await self.http.aclose()
