"""``hf://org/name[@revision]``: a Hugging Face Hub repository (or an enterprise mirror).

Documented hub endpoints only:

* ``GET {HF_ENDPOINT}/api/models/{repo}/revision/{rev}?blobs=true``: the commit ``sha`` and
  ``siblings`` with ``size`` and, for LFS files, ``lfs.sha256`` (verified after download);
* ``GET {HF_ENDPOINT}/{repo}/resolve/{commit}/{path}`` with ``Range``: the bytes, usually
  via a redirect to a CDN, which aiohttp follows (dropping ``Authorization`` cross-origin).

Downloads pin the commit the listing returned, so a branch moving mid-download cannot mix
two revisions. ``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``) is sent as a bearer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from urllib.parse import quote

from yarl import URL

from sidecar.layout import UnsafePathError, safe_relpath
from sidecar.sources import RemoteFile, SourceError
from sidecar.sources._http import HttpClient

DEFAULT_ENDPOINT = "https://huggingface.co"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class HfSource:
    """One revision of a hub model repository."""

    def __init__(self, repo: str, revision: str, *, read_timeout: float) -> None:
        self.repo = repo
        self.revision = revision
        self.endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.uses_credentials = bool(token)
        self.uri = f"hf://{repo}@{revision}"
        self.http = HttpClient(self.uri, read_timeout=read_timeout)
        self.commit: str | None = None

    async def list_files(self) -> list[RemoteFile]:
        url = URL(
            f"{self.endpoint}/api/models/{quote(self.repo, safe='/')}/revision/"
            f"{quote(self.revision, safe='')}?blobs=true",
            encoded=True,
        )
        body, _ = await self.http.get_bytes(url, "model info", headers=self._headers)
        try:
            info = json.loads(body)
            siblings = info["siblings"]
        except (ValueError, KeyError, TypeError):
            raise SourceError(f"{self.uri}: the hub returned malformed model info") from None
        commit = info.get("sha")
        self.commit = commit if isinstance(commit, str) and commit else self.revision
        files: list[RemoteFile] = []
        for sib in siblings:
            name = sib.get("rfilename") if isinstance(sib, dict) else None
            if not isinstance(name, str):
                raise SourceError(f"{self.uri}: malformed sibling {sib!r}")
            try:
                path = safe_relpath(name)
            except UnsafePathError as exc:
                raise SourceError(f"{self.uri}: {exc}") from None
            lfs = sib.get("lfs") or {}
            size = sib.get("size", lfs.get("size"))
            if not isinstance(size, int) or size < 0:
                raise SourceError(f"{self.uri}: {path}: no size in model info (blobs=true)")
            sha = lfs.get("sha256") if isinstance(lfs, dict) else None
            files.append(
                RemoteFile(
                    path, size, sha if isinstance(sha, str) and _SHA256_RE.match(sha) else None
                )
            )
        return files

    def version(self, path: str) -> str | None:
        return self.commit

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        rev = self.commit or self.revision
        url = URL(
            f"{self.endpoint}/{quote(self.repo, safe='/')}/resolve/{quote(rev, safe='')}/"
            f"{quote(safe_relpath(path), safe='/')}",
            encoded=True,
        )
        async for chunk in self.http.stream_range(url, path, start, end, headers=self._headers):
            yield chunk

    async def aclose(self) -> None:
        await self.http.aclose()
