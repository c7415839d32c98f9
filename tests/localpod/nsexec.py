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

``readOnlyRootFilesystem`` (``readOnlyRoot``): every mount the namespace copied from the host
(``/`` first) except ``/proc``, ``/sys`` and ``/dev`` is remounted read-only here, after the
volumes and homes are in place (they are mounts of their own and keep their own flags); the
per-mount flags (``nosuid``, ``nodev``, ``noexec``) are kept. Homes: a private tmpfs owned
by the container's user at each HOME-like directory (the image's home, built for that user);
mountpoints the container's volumes need inside a home are made there, owned by that user,
and the directories of the host that must stay visible under a home (``keep``: the Python
installation, the checkout) are bound back read-only, as parts of the image. Every source
is opened (``O_PATH``) before the homes cover anything, and bound from that descriptor.

Mounts are made with mount(2) through ``ctypes`` (no ``mount`` process per mount: a
container starts in milliseconds).

The user: the runner passes ``wrapper`` (``setpriv`` with the container's uid, gid, groups,
no capabilities and no_new_privs), which this script execs with the command appended, so the
command runs unprivileged with the pid the runner watches.

SPEC.json: ``{"mounts": [{"source", "target", "readOnly", "propagation", "create"}],
"homes": [{"path", "uid", "gid", "keep": [...]}], "readOnlyRoot": bool, "wrapper": [...],
"argv": [...], "cwd": "...", "startedFd": N}``; ``startedFd`` is a pipe the runner reads:
it closes when the command is exec'd (close-on-exec), which tells the runner the container
has started. ``create`` (``{"uid", "gid", "isFile"}`` or null) asks for a missing
target to be made; the runner has already created every other source and target.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
PER_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


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


def _mountinfo() -> list[tuple[str, list[str], list[str]]]:
    """(mount point, per-mount options, optional fields) of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((_unescape(fields[4]), fields[5].split(","), fields[6:sep]))
    return out


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _mount(
    source: str | None,
    target: str,
    flags: int,
    fstype: str | None = None,
    data: str | None = None,
    *,
    fatal: bool = True,
) -> bool:
    def b(v: str | None) -> bytes | None:
        return None if v is None else v.encode()

    if _libc.mount(b(source), b(target), b(fstype), flags, b(data)) == 0:
        return True
    err = ctypes.get_errno()
    sys.stderr.write(
        f"localpod: mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r}) failed: "
        f"{os.strerror(err)}\n"
    )
    if fatal:
        raise SystemExit(126)
    return False


def _create(target: str, uid: int, gid: int, is_file: bool = False) -> None:
    """Make a missing mountpoint (and its missing parents) owned by the container's user."""
    missing: list[str] = []
    p = target if not is_file else os.path.dirname(target)
    while not os.path.exists(p):
        missing.insert(0, p)
        p = os.path.dirname(p)
    for d in missing:
        os.mkdir(d, 0o755)
        os.chown(d, uid, gid)
    if is_file and not os.path.exists(target):
        with open(target, "a", encoding="utf-8"):
            pass
        os.chown(target, uid, gid)


def _bind(fd: int, target: str, *, recursive: bool = True) -> None:
    """Bind what ``fd`` (an O_PATH descriptor) names at ``target``."""
    _mount(f"/proc/self/fd/{fd}", target, MS_BIND | (MS_REC if recursive else 0))


def _remount_ro(target: str, keep_flags: int = 0, *, fatal: bool = True) -> bool:
    return _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | keep_flags, fatal=fatal)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    mounts = spec["mounts"]
    homes = spec.get("homes") or []
    bidir_sources = {
        os.path.realpath(m["source"]) for m in mounts if m["propagation"] == "Bidirectional"
    }
    copied = _mountinfo()
    for point, _opts, optional in copied:
        shared = any(o.startswith("shared:") for o in optional)
        if shared and not any(_under(point, s) for s in bidir_sources):
            _mount(None, point, MS_SLAVE)
    # every source is held open before a home may cover it
    src_fds = [os.open(m["source"], os.O_PATH | os.O_CLOEXEC) for m in mounts]
    keep_fds = [
        (k, os.open(k, os.O_PATH | os.O_CLOEXEC)) for h in homes for k in h.get("keep") or []
    ]
    for home in homes:
        data = f"mode=0755,uid={int(home['uid'])},gid={int(home['gid'])}"
        _mount("tmpfs", home["path"], MS_NOSUID | MS_NODEV, "tmpfs", data)
    for path, fd in keep_fds:  # parts of the "image" that live under a home
        _create(path, 0, 0)
        _bind(fd, path)
        _remount_ro(path)
    for m, fd in zip(mounts, src_fds, strict=True):
        dst = m["target"]
        if m.get("create"):
            c = m["create"]
            _create(dst, int(c["uid"]), int(c["gid"]), bool(c.get("isFile")))
        if m["propagation"] == "Bidirectional":
            # a plain bind of a shared mount joins its peer group: mounts made on dst
            # propagate to the host (kubelet uses rshared; nothing is mounted below yet)
            _bind(fd, dst, recursive=False)
        else:
            _bind(fd, dst)
            if m["propagation"] == "None":
                _mount(None, dst, MS_PRIVATE | MS_REC)
        if m["readOnly"]:
            _remount_ro(dst)
        os.close(fd)
    if spec.get("readOnlyRoot"):
        # what the container itself placed keeps its flags; everything copied from the
        # host (the "image") becomes read-only, except the kernel's own filesystems
        placed = [h["path"] for h in homes] + [m["target"] for m in mounts]
        for point, opts, _optional in copied:
            if any(_under(point, k) for k in ("/proc", "/sys", "/dev")):
                continue
            if any(_under(point, p) for p in placed) or "ro" in opts:
                continue
            keep = sum(flag for name, flag in PER_MOUNT_FLAGS.items() if name in opts)
            _remount_ro(point, keep, fatal=point == "/")
    cwd = spec.get("cwd") or "/"
    os.chdir(cwd)
    if spec.get("startedFd") is not None:
        os.set_inheritable(int(spec["startedFd"]), False)  # closes at exec: "started"
    argv = [*(spec.get("wrapper") or []), *spec["argv"]]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"localpod: cannot exec {argv[0]!r}: {exc}\n")
        raise SystemExit(127) from exc


if __name__ == "__main__":
    main()
