"""The HTTP plumbing shared by the http, s3 and hf sources.

One place maps HTTP outcomes onto the source error classes (401/403/404 → access denied,
5xx/429/network/stall → retryable, anything else → a plain error) and streams ranged bodies
while counting bytes, so a short or dropped body can never be mistaken for a complete one.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

from sidecar.sources import SourceAccessError, SourceError, SourceUnavailableError

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def _clip(text: str, limit: int = 200) -> str:
    # S3-style XML errors: keep the code and message, drop the markup
    code = re.search(r"<Code>([^<]*)</Code>", text)
    if code:
        msg = re.search(r"<Message>([^<]*)</Message>", text)
        text = code.group(1) + (f" ({msg.group(1)})" if msg else "")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class HttpClient:
    """A lazily created aiohttp session plus error mapping; ``what`` names the source."""

    def __init__(self, what: str, *, read_timeout: float) -> None:
        self.what = what
        self.read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # created on first use so the session binds to the loop that actually runs it
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=30, sock_read=self.read_timeout
                ),
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=32),
                auto_decompress=False,
                # HTTP(S)_PROXY / NO_PROXY: clusters often reach hubs and S3 through a proxy
                trust_env=True,
                # the default 64 KiB buffer caps one connection well below disk speed
                read_bufsize=1 << 22,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def check_status(self, resp: aiohttp.ClientResponse, target: str) -> None:
        """Raise the matching source error for a non-2xx response."""
        if resp.status < 300:
            return
        try:
            body = _clip(await resp.text(errors="replace"))
        except (aiohttp.ClientError, TimeoutError):
            body = ""
        detail = f"HTTP {resp.status} {resp.reason or ''}".strip() + (f": {body}" if body else "")
        if resp.status in (401, 403, 404):
            raise SourceAccessError(f"{self.what}: access denied to {target}: {detail}")
        if resp.status >= 500 or resp.status in (408, 429):
            raise SourceUnavailableError(f"{self.what}: {target}: {detail}")
        raise SourceError(f"{self.what}: {target}: {detail}")

    async def get_bytes(
        self, url: Any, target: str, *, headers: Mapping[str, str] | None = None
    ) -> tuple[bytes, aiohttp.ClientResponse]:
        try:
            async with self.session.get(url, headers=headers) as resp:
                await self.check_status(resp, target)
                return await resp.read(), resp
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SourceUnavailableError(
                f"{self.what}: {target}: {type(exc).__name__}: {exc}"
            ) from None

    async def stream_range(
        self,
        url: Any,
        target: str,
        start: int,
        end: int,
        *,
        headers: Mapping[str, str] | None = None,
        total_size: int | None = None,
        on_response: Callable[[aiohttp.ClientResponse], None] | None = None,
    ) -> AsyncIterator[bytes]:
        """Yield exactly ``end - start`` bytes of ``url`` or raise."""
        hdrs = dict(headers or {})
        hdrs["Range"] = f"bytes={start}-{end - 1}"
        want = end - start
        got = 0
        try:
            async with self.session.get(url, headers=hdrs) as resp:
                await self.check_status(resp, target)
                if resp.status == 206:
                    m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
                        raise SourceError(
                            f"{self.what}: {target}: asked for bytes {start}-{end - 1}, got "
                            f"Content-Range {resp.headers.get('Content-Range')!r}"
                        )
                    if total_size is not None and m.group(3) not in ("*", str(total_size)):
                        raise SourceError(
                            f"{self.what}: {target}: size changed at the source "
                            f"(listed {total_size}, now {m.group(3)} bytes)"
                        )
                elif start != 0:
                    raise SourceError(
                        f"{self.what}: {target}: server ignored the Range request "
                        f"(HTTP {resp.status})"
                    )
                if on_response is not None:
                    on_response(resp)
                # iter_chunks hands over the received buffers as they are (iter_chunked and
                # iter_any join or slice them: one more copy of every byte)
                async for raw, _ in resp.content.iter_chunks():
                    chunk = raw[: want - got] if got + len(raw) > want else raw
                    got += len(chunk)
                    yield chunk
                    if got >= want:
                        break
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SourceUnavailableError(
                f"{self.what}: {target}: connection failed after {got} of {want} bytes: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if got != want:
            raise SourceUnavailableError(
                f"{self.what}: {target}: truncated body: got {got} of {want} bytes "
                f"(range {start}-{end - 1})"
            )
