"""The serving TLS context and its reload in place.

Kubernetes updates a Secret volume by writing a new timestamped directory and atomically
swapping the ``..data`` symlink; cert-manager and friends may instead rewrite the files.
``CertReloader`` polls the *resolved* paths (realpath, inode, mtime, size) every second, which
catches both without inotify or extra dependencies, and loads the new pair into the **same**
``SSLContext``: every new handshake uses it, connections already open keep theirs (OpenSSL
copies the certificate into each connection when it is created), nothing restarts.

Loading a mismatched cert/key into a live context would leave it without a usable key (OpenSSL
drops the old key when the new cert does not match it), so a change is first copied to a
private temporary directory, proven on a scratch context, and only then loaded into the live
one from that same copy: a half-written or mismatched pair keeps the old one and logs an error.
File reads and validation run in a worker thread; only the final ``load_cert_chain`` of the
proven copy runs on the event loop thread, which is the thread that creates connections from
the context (mutating an ``SSL_CTX`` while another thread creates connections from it is a
data race).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 1.0

_Signature = tuple[tuple[str, int, int, int, int], ...]


class TLSError(Exception):
    """The certificate or key cannot be used; the message names the files."""


def build_server_context(
    cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A server context that speaks TLS 1.2 and 1.3 only, serving the given pair."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, Path(cert_file), Path(key_file))
    return context


def _load_pair(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as e:
        raise TLSError(f"cannot load TLS pair cert={cert_file} key={key_file}: {e}") from None


def _signature(paths: tuple[Path, ...]) -> _Signature:
    entries = []
    for path in paths:
        st = os.stat(path)  # follows the ..data symlink: a swap changes the inode
        entries.append((os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size, st.st_dev))
    return tuple(entries)


@dataclass(frozen=True)
class _Staged:
    directory: Path
    cert: Path
    key: Path


class CertReloader:
    """Owns the live server ``SSLContext`` and reloads it when the cert/key files change.

    ``on_result`` is called with ``"success"`` or ``"failure"`` after each reload attempt
    (the app counts them in metrics).
    """

    def __init__(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        *,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self._paths = (self.cert_file, self.key_file)
        self.on_result = on_result
        # Signature first: a change landing between the two steps is then seen next poll.
        try:
            self._seen = _signature(self._paths)
        except OSError as e:
            raise TLSError(
                f"cannot load TLS pair cert={self.cert_file} key={self.key_file}: {e}"
            ) from None
        self.context = build_server_context(self.cert_file, self.key_file)
        self.reloads = 0

    def _stage(self) -> tuple[_Signature, _Staged] | None:
        """Worker-thread half: notice a change, copy the pair aside and prove it loads.

        Returns ``None`` when nothing changed (or files are briefly missing mid-swap).
        """
        try:
            current = _signature(self._paths)
        except OSError:
            return None  # mid-swap or being rewritten: look again next tick
        if current == self._seen:
            return None
        directory = Path(tempfile.mkdtemp(prefix="modelcache-tls-"))
        staged = _Staged(directory, directory / "tls.crt", directory / "tls.key")
        try:
            staged.cert.write_bytes(self.cert_file.read_bytes())
            fd = os.open(staged.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(self.key_file.read_bytes())
            # The files may have changed again while we copied; then this copy may mix two
            # generations. Only a signature stable across the copy is accepted.
            if _signature(self._paths) != current:
                shutil.rmtree(directory, ignore_errors=True)
                return None
            _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), staged.cert, staged.key)
        except (OSError, TLSError) as e:
            shutil.rmtree(directory, ignore_errors=True)
            self._seen = current  # do not retry (and re-log) until the files change again
            log.error(
                "serving certificate change rejected, keeping the previous one: %s",
                e,
                extra={"cert_file": str(self.cert_file), "key_file": str(self.key_file)},
            )
            self._report("failure")
            return None
        return current, staged

    def _apply(self, signature: _Signature, staged: _Staged) -> None:
        """Event-loop half: load the proven copy into the live context."""
        try:
            _load_pair(self.context, staged.cert, staged.key)
        except TLSError as e:  # proven a moment ago; only a vanished temp dir gets here
            log.error("serving certificate reload failed, keeping the previous one: %s", e)
            self._report("failure")
            return
        finally:
            shutil.rmtree(staged.directory, ignore_errors=True)
        self._seen = signature
        self.reloads += 1
        log.info(
            "serving certificate reloaded",
            extra={"cert_file": str(self.cert_file), "reloads": self.reloads},
        )
        self._report("success")

    def _report(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)

    def check(self) -> bool:
        """One synchronous poll (tests, and callers without a loop); True if reloaded."""
        staged = self._stage()
        if staged is None:
            return False
        self._apply(*staged)
        return self._seen == staged[0]

    async def watch(self, interval: float = POLL_INTERVAL_SECONDS) -> None:
        """Poll forever; cancel the task to stop."""
        while True:
            await asyncio.sleep(interval)
            staged = await asyncio.to_thread(self._stage)
            if staged is not None:
                self._apply(*staged)
