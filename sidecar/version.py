"""The installed modelcache version, for every command's ``--version`` (webhook, certs,
sidecar). Pure: standard library only, so any role may import it."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    try:
        return metadata.version("modelcache")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
