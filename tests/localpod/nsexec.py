"""Set up one container's mounts inside a fresh mount namespace, then exec its command.

Run by the local pod runner as ``unshare --mount --propagation unchanged -- python -I
nsexec.py SPEC.json``: ``unshare`` gives the container its own mount namespace (what a
container runtime does), this script bind-mounts every volumeMount at its mountPath, the way
the kubelet and runc do, and then ``exec``s the container's command so its pid is the one the
runner watches and signals.

Standard library only and run with ``-I``: it must not depend on the project being importable
in the namespace it is building.

Propagation, as Kubernetes defines it:

* every mount copied from the host is made a slave first (unless it is the source of a
  ``Bidirectional`` mount), so nothing this container mounts leaks back to the host, even on
  hosts whose ``/`` is shared (systemd);
* ``Bidirectional``: the source was made a shared mount in the host namespace by the runner;
  its copy here stays in the host's peer group, so a FUSE mount made on top of the bind
  inside this namespace propagates to the host and from there to the other containers;
* ``HostToContainer``: recursive bind of a slave, so mounts that appear on the source later
  (the sidecar's FUSE mount) show up here too;
* ``None``: recursive bind, then made private.

SPEC.json: ``{"mounts": [{"source", "target", "readOnly", "propagation", "isFile"}],
"argv": [...], "cwd": "..."}``. The runner has already created every source and target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _shared_mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            optional = fields[6:sep]
            if any(o.startswith("shared:") for o in optional):
                points.append(_unescape(fields[4]))
    return points


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(f"localpod: mount {' '.join(args)} failed: {proc.stderr.strip()}\n")
        raise SystemExit(126)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    bidir_sources = {
        os.path.realpath(m["source"]) for m in spec["mounts"] if m["propagation"] == "Bidirectional"
    }
    for point in _shared_mountpoints():
        if not any(point == s or point.startswith(s + "/") for s in bidir_sources):
            _mount("--make-slave", point)
    for m in spec["mounts"]:
        src, dst = m["source"], m["target"]
        if m["propagation"] == "Bidirectional":
            # a plain bind of a shared mount joins its peer group: mounts made on dst
            # propagate to the host (kubelet uses rshared; nothing is mounted below yet)
            _mount("--bind", src, dst)
        else:
            _mount("--rbind", src, dst)
            if m["propagation"] == "None":
                _mount("--make-rprivate", dst)
        if m["readOnly"]:
            _mount("-o", "remount,bind,ro", dst)
    cwd = spec.get("cwd") or "/"
    os.chdir(cwd)
    argv = spec["argv"]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"localpod: cannot exec {argv[0]!r}: {exc}\n")
        raise SystemExit(127) from exc


if __name__ == "__main__":
    main()
