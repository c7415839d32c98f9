#!/bin/sh
# Installs what `make test-images` needs from Debian's archive when it is missing: buildah
# (builds the images), podman and runc (run them; runc because crun refuses hosts with hybrid
# cgroups), debootstrap (the local base). Without root or apt-get, names what is missing and
# fails: the image smoke test cannot run without them.
set -eu
missing=""
for tool in buildah podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing:$missing (as root on Debian: apt-get install$missing)" >&2
    exit 1
fi
echo "installing Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# The package lists are read once per machine: when `make test` (scripts/system-deps.sh) has
# just updated them the install goes through at once; otherwise update, then install.
# shellcheck disable=SC2086
if ! apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1; then
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
for tool in $missing; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "error: $tool is still missing after apt-get install" >&2
        exit 1
    }
done
