"""``hf://org/name[@revision]``: a Hugging Face Hub repository (or an enterprise mirror).

Documented hub endpoints only:

* ``GET {HF_ENDPOINT}/api/models/{repo}/revision/{rev}?blobs=true``: the commit ``sha`` and
  ``siblings`` with ``size`` and, for LFS files, ``lfs.sha256`` (verified after download);
* ``GET {HF_ENDPOINT}/{repo}/resolve/{commit}/{path}`` with ``Range``: the bytes, usually
  via a redirect to a CDN, which aiohttp follows (dropping ``Authorization`` cross-origin).

Downloads pin the commit the listing returned, so a branch moving mid-download cannot mix
two revisions: ``hf://org/name@rev`` lists ``rev`` (a branch, tag or commit) and fetches every
file from the commit that listing names. ``HF_TOKEN`` (or the older
``HUGGING_FACE_HUB_TOKEN``) is sent as a bearer.

Refusals say what to do: 401 (no or invalid token), 403 (gated or private: request access),
404 (no such repository or revision; the hub also answers 404 for a private repository
when no token is sent, which the message says).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Mapping
from urllib.parse import quote

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

DEFAULT_ENDPOINT = "https://huggingface.co"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class HfSource:
    """One revision of a hub model repository."""

    def __init__(
        self,
        repo: str,
        revision: str,
        *,
        read_timeout: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.repo = repo
        self.revision = revision
        self.endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.uses_credentials = bool(token)
        self.uri = f"hf://{repo}@{revision}"
        self.http = HttpClient(self.uri, read_timeout=read_timeout, advice=self._advice)
        self.commit: str | None = None

    def _advice(self, status: int, code: str, body: str) -> tuple[type[SourceAccessError], str]:
        # the hub names the case in X-Error-Code (RepoNotFound, RevisionNotFound,
        # EntryNotFound, GatedRepo); it answers 401 RepoNotFound for a private or missing
        # repository when no token is sent
        page = f"{self.endpoint}/{self.repo}"
        if code in ("RepoNotFound", "RevisionNotFound", "EntryNotFound"):
            status = 404
        elif code == "GatedRepo":
            status = 403
        if status == 401:
            if self.uses_credentials:
                return SourceUnauthorizedError, (
                    "the hub rejects the token in HF_TOKEN (invalid or revoked); set HF_TOKEN "
                    "in the pod (from a Secret) to a valid token that can read " + self.repo
                )
            return SourceUnauthorizedError, (
                "no or invalid token; set HF_TOKEN in the pod (from a Secret) to a token "
                f"that can read {self.repo} (private and gated models need one)"
            )
        if status == 403:
            if not self.uses_credentials:
                return SourceForbiddenError, (
                    f"the model is gated or private; request access at {page}, then set "
                    "HF_TOKEN in the pod (from a Secret) to a token of the account granted it"
                )
            return SourceForbiddenError, (
                f"the model is gated or private and this token has no access to it; request "
                f"access at {page} with the account whose token is in HF_TOKEN"
            )
        if code == "RevisionNotFound":
            what = f"revision {self.revision!r} of {self.repo} does not exist"
        else:
            what = f"no repository {self.repo} (revision {self.revision}) at {self.endpoint}"
        hint = "" if self.uses_credentials else " (or it is private and no HF_TOKEN is set)"
        return SourceNotFoundError, f"{what}{hint}; check the model name and revision"

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

    def _resolve_url(self, path: str) -> URL:
        rev = self.commit or self.revision
        return URL(
            f"{self.endpoint}/{quote(self.repo, safe='/')}/resolve/{quote(rev, safe='')}/"
            f"{quote(safe_relpath(path), safe='/')}",
            encoded=True,
        )

    def download_target(self, path: str) -> tuple[str, dict[str, str]]:
        """The resolve URL of a listed file (at the listed commit) and the headers a download
        needs, token included (for a node-level downloader such as Dragonfly's daemon)."""
        return str(self._resolve_url(path)), dict(self._headers)

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        url = self._resolve_url(path)
        async for chunk in self.http.stream_range(url, path, start, end, headers=self._headers):
            yield chunk

    async def aclose(self) -> None:
        await self.http.aclose()
