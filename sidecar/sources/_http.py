"""The HTTP plumbing shared by the http, s3 and hf sources.

One place maps HTTP outcomes onto the source error classes (404 → not found, 401 →
unauthorized, 403 → forbidden, 5xx/429/stall → retryable, no answer at all → unreachable,
anything else → a plain error) and streams ranged bodies while counting bytes, so a short or
dropped body can never be mistaken for a complete one. Each source passes an
:data:`AccessAdvice` that turns a refusal into the sentence a user can act on (which token to
set, where to request access), and may refine the class from the body (S3 error codes).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

from sidecar.sources import (
    SourceAccessError,
    SourceError,
    SourceForbiddenError,
    SourceNotFoundError,
    SourceUnauthorizedError,
    SourceUnavailableError,
    SourceUnreachableError,
)

#: ``(status, code, body) -> (error class, advice)`` for a 401/403/404 answer; ``code`` is
#: the machine-readable error code when the server sends one (the hub's ``X-Error-Code``
#: header, S3's ``<Code>``), else "".
AccessAdvice = Callable[[int, str, str], tuple[type[SourceAccessError], str]]
_S3_CODE_RE = re.compile(r"<Code>([^<]*)</Code>")

_ACCESS_CLASSES: dict[int, type[SourceAccessError]] = {
    401: SourceUnauthorizedError,
    403: SourceForbiddenError,
    404: SourceNotFoundError,
}
_HEADLINES: dict[type[SourceAccessError], str] = {
    SourceUnauthorizedError: "unauthorized",
    SourceForbiddenError: "forbidden",
    SourceNotFoundError: "not found",
}
#: No answer at all (as opposed to a dropped body): worth saying "unreachable".
_NO_ANSWER = (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError, TimeoutError)
UNREACHABLE_ADVICE = (
    "check the address, DNS, the proxy settings (HTTPS_PROXY, NO_PROXY) and network "
    "policies between the node and the source"
)


def default_advice(status: int, code: str, body: str) -> tuple[type[SourceAccessError], str]:
    cls = _ACCESS_CLASSES[status]
    if cls is SourceNotFoundError:
        return cls, "check the URI"
    if cls is SourceUnauthorizedError:
        return cls, "the source wants credentials modelcache does not have"
    return cls, "the source refuses access"


def access_error(
    what: str, cls: type[SourceAccessError], detail: str, advice: str
) -> SourceAccessError:
    """``<what>: <not found|unauthorized|forbidden> (<detail>); <advice>``."""
    return cls(f"{what}: {_HEADLINES.get(cls, 'access denied')} ({detail}); {advice}")


def unreachable_error(what: str, target: str, exc: BaseException) -> SourceUnreachableError:
    return SourceUnreachableError(
        f"{what}: unreachable ({target}: {type(exc).__name__}: {exc}); {UNREACHABLE_ADVICE}"
    )


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

    def __init__(
        self, what: str, *, read_timeout: float, advice: AccessAdvice = default_advice
    ) -> None:
        self.what = what
        self.read_timeout = read_timeout
        self.advice = advice
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
            raw = await resp.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError):
            raw = ""
        body = _clip(raw)
        m = _S3_CODE_RE.search(raw)
        code = resp.headers.get("X-Error-Code") or (m.group(1) if m else "")
        detail = f"HTTP {resp.status} {resp.reason or ''}".strip() + (f": {body}" if body else "")
        if resp.status in _ACCESS_CLASSES:
            cls, advice = self.advice(resp.status, code, body)
            raise access_error(self.what, cls, f"{detail}, for {target}", advice)
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
        except _NO_ANSWER as exc:
            raise unreachable_error(self.what, target, exc) from None
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
        except _NO_ANSWER as exc:
            if got == 0:
                raise unreachable_error(self.what, target, exc) from None
            raise SourceUnavailableError(
                f"{self.what}: {target}: stalled after {got} of {want} bytes: "
                f"{type(exc).__name__}: {exc}"
            ) from None
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
