#!/bin/sh
# Installs the Debian packages the tests, benchmarks and the demo use, when they are missing
# and we are root (CI and fresh machines). Without root, say what is missing and go on: the
# tests that need a missing tool skip with that reason.
set -eu
missing=""
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
command -v aria2c >/dev/null 2>&1 || missing="$missing aria2"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    # nginx-light's package scripts start a system nginx on port 80; tests start their own
    systemctl stop nginx >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true
else
    echo "warning: missing Debian packages:$missing (run as root, or install them);" \
         "tests that need them will skip" >&2
fi
