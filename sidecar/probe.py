"""``python -m sidecar probe``: exit 0 only when the FUSE mount serves the models.

The kubelet runs this every second or two (startupProbe of the native sidecar; the classic
sidecar's postStart runs it with ``--wait``), so it imports nothing beyond the standard
library and does three cheap checks, in order:

1. ``/proc/self/mountinfo`` has a ``fuse.*`` mount exactly at the mountpoint (a plain
   directory, or another filesystem mounted there, is not the sidecar's mount);
2. listing the mountpoint answers within a bound (a dead daemon answers ``ENOTCONN``, a hung
   one not at all: both are failures, the hung one after ``LIST_TIMEOUT`` seconds);
3. every ``--model NAME`` is a directory at the top of the mount, or was left out on
   purpose: ``mount --on-failure continue`` leaves out a model whose source cannot be listed
   and publishes the reason as the read-only file ``<mountpoint>/.left-out/<NAME>`` instead
   (model names never start with a dot, so the marker cannot clash with a model). Such a
   model counts as served: the app loads it by itself, exactly as without modelcache, and the
   probe's command line stays the same whatever the mount decided.

Failures print one line on stderr naming the reason; the exit code is 1 (and 2 for bad
usage), so a failing probe explains itself in ``kubectl describe pod``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
#: Directory at the top of the mount holding one file per model left out on purpose.
LEFT_OUT_DIR = ".left-out"
#: Seconds to wait for the mount to answer a listing before calling it hung.
LIST_TIMEOUT = 5.0
#: Seconds between attempts with ``--wait``.
RETRY_INTERVAL = 0.2


class ProbeFailure(Exception):
    """The mount does not serve (yet); the message is the one-line reason."""


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and len(field) - i >= 4 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mounts(mountinfo: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount of this process's namespace (later entries are mounted on top)."""
    entries: list[MountEntry] = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, sep, right = line.partition(" - ")
            fields = left.split()
            rest = right.split()
            if not sep or len(fields) < 5 or len(rest) < 2:
                continue
            entries.append(MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return entries


def canonical_path(path: str) -> str:
    """The absolute path the kernel reports, without touching the last component.

    ``realpath`` of the mountpoint itself would stat it, which fails on a dead mount; its
    parent is resolved instead (``/tmp`` may be a symlink, for example).
    """
    absolute = os.path.abspath(path)
    parent, name = os.path.split(absolute)
    return os.path.join(os.path.realpath(parent), name) if name else absolute


def find_mount(path: str, mountinfo: str = MOUNTINFO) -> MountEntry | None:
    """The topmost mount exactly at ``path``, or None."""
    target = canonical_path(path)
    found = None
    for entry in read_mounts(mountinfo):
        if entry.mountpoint == target:
            found = entry
    return found


def is_fuse(entry: MountEntry | None) -> bool:
    return entry is not None and (entry.fstype == "fuse" or entry.fstype.startswith("fuse."))


def _list_with_timeout(path: str, timeout: float) -> list[str]:
    result: list[list[str] | BaseException] = []

    def target() -> None:
        try:
            result.append(os.listdir(path))
        except OSError as exc:
            result.append(exc)

    # a daemon thread: a listing stuck in a hung FUSE daemon must not keep the probe alive
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise ProbeFailure(f"{path}: the FUSE mount did not answer a listing in {timeout:g}s")
    value = result[0]
    if isinstance(value, BaseException):
        if isinstance(value, OSError) and value.errno is not None:
            raise ProbeFailure(f"{path}: listing failed: {os.strerror(value.errno)}")
        raise ProbeFailure(f"{path}: listing failed: {value}")
    return value


def check_mount(
    mountpoint: str,
    models: list[str],
    mountinfo: str = MOUNTINFO,
    list_timeout: float = LIST_TIMEOUT,
) -> None:
    """Raise ProbeFailure with the reason unless the mount serves every named model."""
    entry = find_mount(mountpoint, mountinfo)
    if entry is None:
        raise ProbeFailure(f"{mountpoint}: nothing is mounted there")
    if not is_fuse(entry):
        raise ProbeFailure(f"{mountpoint}: mounted filesystem is {entry.fstype}, not FUSE")
    names = set(_list_with_timeout(mountpoint, list_timeout))
    missing = [m for m in models if m not in names and not is_left_out(mountpoint, m)]
    if missing:
        raise ProbeFailure(
            f"{mountpoint}: model(s) {', '.join(missing)} not served"
            f" (the mount has: {', '.join(sorted(names)) or 'nothing'})"
        )
    for model in models:
        if model in names and not os.path.isdir(os.path.join(mountpoint, model)):
            raise ProbeFailure(f"{mountpoint}: {model} is not a directory")


def is_left_out(mountpoint: str, model: str) -> bool:
    """The mount left ``model`` out on purpose (its marker file is there)."""
    if "/" in model or model.startswith("."):
        return False
    return os.path.isfile(os.path.join(mountpoint, LEFT_OUT_DIR, model))


def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + max(0.0, float(args.wait))
    while True:
        try:
            check_mount(args.mountpoint, list(args.model))
        except ProbeFailure as exc:
            if time.monotonic() >= deadline:
                print(f"probe: {exc}", file=sys.stderr, flush=True)
                # skip interpreter teardown: a listing thread may still sit in a hung mount
                os._exit(1)
            time.sleep(RETRY_INTERVAL)
            continue
        except OSError as exc:
            print(f"probe: cannot read mount table: {exc}", file=sys.stderr, flush=True)
            return 1
        return 0
