#!/bin/sh
# Assembles the root filesystem of a release image inside the build (the `runtime` stage of
# Dockerfile.webhook and Dockerfile.sidecar), from whatever Debian bookworm base that stage
# runs on: the public Python image (interpreter under /usr/local) or the local debootstrap
# base (Debian's python3 under /usr).
#   sh image-rootfs.sh DEST [FILE...]
# DEST receives: the interpreter and its standard library (without tests, IDLE, tkinter,
# ensurepip, 2to3, the build config and the base's own site-packages), /opt/venv and /app as
# built, every shared library that the interpreter, its extension modules, the venv's
# extension modules and each extra FILE load (found with ldd, so nothing is guessed), CA
# certificates, /bin/sh (dash) and ldconfig with a fresh cache (ctypes.util.find_library,
# which the FUSE binding uses, reads it). No package manager, no perl, no apt lists.
set -eu
dest="$1"
shift
[ -n "$dest" ] && [ "$dest" != / ] || {
    echo "image-rootfs.sh: DEST must be a new directory" >&2
    exit 2
}
mkdir -p "$dest"

# Keep the base's merged-/usr layout (/bin -> usr/bin ...) so paths from ldd land right.
for top in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$top" ]; then
        cp -P "/$top" "$dest/$top"
    fi
done
mkdir -p "$dest/usr/bin" "$dest/usr/sbin" "$dest/etc" "$dest/tmp" "$dest/var/tmp" \
    "$dest/dev" "$dest/proc" "$dest/sys" "$dest/run" "$dest/app" "$dest/opt"
chmod 1777 "$dest/tmp" "$dest/var/tmp"

# Both copy into the directory's canonical path (/lib64/x lands in /usr/lib64/x when /lib64 is
# a link to usr/lib64), since cp --parents will not go through the links made above.
copy_path() { # copy one path (a file or a symlink) as it is
    dir="$(readlink -f "$(dirname "$1")")"
    mkdir -p "$dest$dir"
    cp -a "$1" "$dest$dir/"
}
copy_resolved() { # copy a file under its own name, symlinks resolved, mode kept (setuid too)
    dir="$(readlink -f "$(dirname "$1")")"
    mkdir -p "$dest$dir"
    cp -L --preserve=mode,ownership "$1" "$dest$dir/$(basename "$1")"
}

# ---- the interpreter: python3 as the venv names it, and every link on the way -------------
python="$(command -v python3)"
link="$python"
while [ -L "$link" ]; do
    copy_path "$link"
    target="$(readlink "$link")"
    case "$target" in
        /*) link="$target" ;;
        *) link="$(dirname "$link")/$target" ;;
    esac
done
copy_path "$link"
interpreter="$(readlink -f "$python")"

stdlib="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
mkdir -p "$dest$stdlib"
# Copy the standard library without what a server never imports.
(cd "$stdlib" && tar --exclude=./test --exclude=./idlelib --exclude=./tkinter \
    --exclude=./turtledemo --exclude=./ensurepip --exclude=./lib2to3 --exclude='./config-*' \
    --exclude=./site-packages --exclude=./dist-packages --exclude=./unittest/test \
    --exclude=./ctypes/test --exclude=./sqlite3/test --exclude=./pydoc_data \
    --exclude='__pycache__' -cf - .) | (cd "$dest$stdlib" && tar -xf -)
# Byte-code for the standard library, compiled where it will be found (co_filename without
# DEST), so a read-only root filesystem starts as fast as a writable one.
python3 -m compileall -q -j 0 -s "$dest" -p / "$dest$stdlib" >/dev/null

# ---- our code and its virtual environment --------------------------------------------------
cp -a /opt/venv "$dest/opt/venv"
cp -a /app/. "$dest/app/"

# ---- shared libraries: whatever ldd says the ELF files here need ---------------------------
libs="$(mktemp)"
{
    echo "$interpreter"
    find "$dest$stdlib" "$dest/opt/venv" -name '*.so*' -type f
    for extra in "$@"; do echo "$extra"; done
} | while read -r elf; do
    ldd "$elf" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u >"$libs"
# extra files themselves (e.g. fusermount3, libfuse3.so.3), with their mode (setuid stays)
for extra in "$@"; do
    copy_resolved "$extra"
done
while read -r lib; do
    copy_resolved "$lib"
done <"$libs"
rm -f "$libs"

# ---- the rest a process expects to find ----------------------------------------------------
for f in /etc/passwd /etc/group /etc/nsswitch.conf /etc/services /etc/protocols \
    /etc/host.conf /etc/ld.so.conf /etc/ssl/certs/ca-certificates.crt /etc/ssl/openssl.cnf; do
    [ ! -e "$f" ] || copy_resolved "$f"
done
[ ! -d /etc/ld.so.conf.d ] || cp -a /etc/ld.so.conf.d "$dest/etc/"
# OpenSSL's directory (/usr/lib/ssl: certs -> /etc/ssl/certs, cert.pem) as symlinks
openssl_dir="$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().openssl_capath)')"
openssl_dir="$(dirname "$openssl_dir")"
if [ -d "$openssl_dir" ]; then
    mkdir -p "$dest$(dirname "$openssl_dir")"
    cp -a "$openssl_dir" "$dest$(dirname "$openssl_dir")/"
fi
# OpenSSL's default CA file; the hashed directory is not copied, the bundle holds them all
[ -e "$dest$openssl_dir/cert.pem" ] || ln -sf /etc/ssl/certs/ca-certificates.crt "$dest$openssl_dir/cert.pem"
shell="$(readlink -f /bin/sh)"
copy_resolved "$shell"
[ -e "$dest/bin/sh" ] || ln -s "$shell" "$dest/bin/sh"
ldconfig_bin="$(command -v ldconfig || echo /sbin/ldconfig)"
copy_resolved "$ldconfig_bin"
ldconfig -r "$dest"
