#!/bin/sh
# Builds the two release images with whatever container engine runs here.
#   sh scripts/build-images.sh               build $REGISTRY/{webhook,sidecar}:$TAG
#   sh scripts/build-images.sh push          build, then push both to $REGISTRY
#   sh scripts/build-images.sh wheels        download the runtime wheels into .build/wheels
#   sh scripts/build-images.sh base          make the local Debian base image (debootstrap)
#   sh scripts/build-images.sh lock-runtime  re-resolve requirements-runtime.lock (hash-pinned
#                                            runtime dependencies only: what the images install)
# Environment:
#   REGISTRY    image name prefix (default ghcr.io/modelcache)
#   TAG         image tag (default: the version in pyproject.toml)
#   ENGINE      docker|podman|buildah (default: the first one that answers)
#   BASE_IMAGE  base of both images; unset: the Dockerfiles' default (the public Python image);
#               `debootstrap`: a local Debian bookworm base made here from the Debian archive,
#               for machines that reach package registries but no image registry
#   WHEELS      1: install the runtime wheels downloaded on the host (hashes checked) with no
#               index in the build; 0: pip in the build installs from the index (default: 1
#               with BASE_IMAGE=debootstrap, else 0)
#   STORAGE_DRIVER, CONTAINERS_ROOT, CONTAINERS_RUNROOT  storage of podman/buildah (e.g. vfs
#               where overlay is not available); unset: the engine's own configuration
#   NO_CACHE    1: reuse no layer of an earlier build
#   BUILDAH_ISOLATION  isolation of RUN steps in buildah and podman builds (default chroot:
#               works as root with no OCI runtime, cgroups or user namespaces)
# The tag must match the sidecarImage in manifests/core/configmap.yaml and the webhook image in
# manifests/core/deployment.yaml (a test checks the manifests against pyproject's version).
set -eu
cd "$(dirname "$0")/.."

# the Dockerfiles read the wheels from here (.dockerignore lets only this part of it in)
BUILD_DIR=.build
WHEEL_DIR="$BUILD_DIR/wheels"
LOCK=requirements-runtime.lock
# The local base: Debian bookworm, minimal, with the interpreter the public image has (3.11),
# venv support, CA certificates (HTTPS to model sources) and netbase (/etc/services).
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_PACKAGES="python3,python3-venv,ca-certificates,netbase"
BASE_TAR="$BUILD_DIR/base/$SUITE-minbase.tar"

die() {
    echo "error: $*" >&2
    exit 1
}

cmd="${1:-build}"
case "$cmd" in
    build | push | wheels | base | lock-runtime) ;;
    *)
        echo "usage: $0 [build|push|wheels|base|lock-runtime]" >&2
        exit 2
        ;;
esac
[ $# -le 1 ] || {
    echo "usage: $0 [build|push|wheels|base|lock-runtime]" >&2
    exit 2
}

if [ "$cmd" = "lock-runtime" ]; then
    exec uv pip compile pyproject.toml --generate-hashes --python-version 3.11 --no-header \
        -o "$LOCK"
fi

# ---- wheels: every pinned wheel of the runtime lock, hashes checked on the host -------------
download_wheels() {
    # A wheel directory belongs to one lock: start over when the lock changed, so no stale
    # wheel rides along in the build context.
    sum="$(sha256sum "$LOCK" | cut -d' ' -f1)"
    if [ "$(cat "$WHEEL_DIR/.lock-sha256" 2>/dev/null || true)" != "$sum" ]; then
        rm -rf "$WHEEL_DIR"
    fi
    mkdir -p "$WHEEL_DIR"
    pip="${PIP:-python3 -m pip}"
    # Wheels for the image's interpreter (CPython 3.11) and the host's architecture on Debian
    # bookworm's glibc (2.36), whatever Python runs pip here. pip checks every file against
    # the lock's hashes (and skips files already there).
    arch="$(uname -m)"
    platforms="--platform manylinux2014_$arch"
    glibc_minor=17
    while [ "$glibc_minor" -le 36 ]; do
        platforms="$platforms --platform manylinux_2_${glibc_minor}_$arch"
        glibc_minor=$((glibc_minor + 1))
    done
    # shellcheck disable=SC2086
    $pip download --quiet --disable-pip-version-check --require-hashes --only-binary=:all: \
        --no-deps --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
        $platforms -d "$WHEEL_DIR" -r "$LOCK" ||
        die "could not download the wheels of $LOCK (see pip's message above)"
    echo "$sum" >"$WHEEL_DIR/.lock-sha256"
    echo "wheels of $LOCK in $WHEEL_DIR ($(ls "$WHEEL_DIR" | grep -c '\.whl$') files)" >&2
}

# ---- engines --------------------------------------------------------------------------------
storage_flags() {
    flags=""
    [ -z "${STORAGE_DRIVER:-}" ] || flags="$flags --storage-driver $STORAGE_DRIVER"
    [ -z "${CONTAINERS_ROOT:-}" ] || flags="$flags --root $CONTAINERS_ROOT"
    [ -z "${CONTAINERS_RUNROOT:-}" ] || flags="$flags --runroot $CONTAINERS_RUNROOT"
    echo "$flags"
}

# A client binary alone is not enough (e.g. a docker CLI without a daemon): ask it.
engine_works() {
    case "$1" in
        docker) command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 ;;
        # shellcheck disable=SC2046
        podman) command -v podman >/dev/null 2>&1 && podman $(storage_flags) info >/dev/null 2>&1 ;;
        # shellcheck disable=SC2046
        buildah) command -v buildah >/dev/null 2>&1 && buildah $(storage_flags) info >/dev/null 2>&1 ;;
        *) return 1 ;;
    esac
}

find_engine() {
    ENGINE="${ENGINE:-}"
    if [ -z "$ENGINE" ]; then
        for candidate in docker podman buildah; do
            if engine_works "$candidate"; then
                ENGINE="$candidate"
                break
            fi
        done
    fi
    if [ -z "$ENGINE" ] || ! engine_works "$ENGINE"; then
        die "no container engine: none of docker, podman, buildah answers here" \
            "(a docker client without a running daemon does not count); images not built"
    fi
}

# ---- the local base: debootstrap once, cached as a tar under $BUILD_DIR ---------------------
make_base_tar() {
    [ -s "$BASE_TAR" ] && return 0
    [ "$(id -u)" = 0 ] || die "the local base needs root (debootstrap)"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install debootstrap)"
    mkdir -p "$(dirname "$BASE_TAR")"
    root="$(mktemp -d "$BUILD_DIR/base/rootfs.XXXXXX")"
    echo "debootstrap --variant=minbase $SUITE from $MIRROR (once; cached in $BASE_TAR)" >&2
    if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" \
        >"$BUILD_DIR/base/debootstrap.log" 2>&1; then
        tail -n 20 "$BUILD_DIR/base/debootstrap.log" >&2
        rm -rf "$root"
        die "debootstrap failed (log: $BUILD_DIR/base/debootstrap.log)"
    fi
    # What Debian's slim images leave out, now and for packages installed later (the sidecar
    # adds fuse3): downloaded packages, package lists, docs, man pages, translations.
    cat >"$root/etc/dpkg/dpkg.cfg.d/modelcache-slim" <<'EXCLUDES'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EXCLUDES
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/* \
        "$root"/var/log/* "$root"/var/cache/debconf/*-old "$root"/dev/*
    tar -C "$root" --numeric-owner -cf "$BASE_TAR.tmp" .
    rm -rf "$root"
    mv "$BASE_TAR.tmp" "$BASE_TAR"
}

# Prints the name of the local base image, made from the cached tar when the engine lacks it.
local_base() {
    make_base_tar
    sum="$(sha256sum "$BASE_TAR" | cut -c1-12)"
    image="localhost/modelcache-base:$SUITE-$sum"
    # shellcheck disable=SC2046
    case "$ENGINE" in
        buildah)
            if ! buildah $(storage_flags) inspect --type image "$image" >/dev/null 2>&1; then
                ctr="$(buildah $(storage_flags) from scratch)"
                buildah $(storage_flags) add "$ctr" "$BASE_TAR" / >/dev/null
                buildah $(storage_flags) config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                    --env LANG=C.UTF-8 --cmd /bin/sh "$ctr"
                buildah $(storage_flags) commit --quiet --rm "$ctr" "$image" >/dev/null
            fi
            ;;
        podman)
            podman $(storage_flags) image exists "$image" ||
                podman $(storage_flags) import --quiet --change "ENV LANG=C.UTF-8" \
                    --change "CMD [\"/bin/sh\"]" "$BASE_TAR" "$image" >/dev/null
            ;;
        docker)
            docker image inspect "$image" >/dev/null 2>&1 ||
                docker import --change "ENV LANG=C.UTF-8" --change "CMD [\"/bin/sh\"]" \
                    "$BASE_TAR" "$image" >/dev/null
            ;;
    esac
    echo "$image"
}

if [ "$cmd" = "wheels" ]; then
    download_wheels
    exit 0
fi

find_engine
if [ "$cmd" = "base" ]; then
    local_base
    exit 0
fi

REGISTRY="${REGISTRY:-ghcr.io/modelcache}"
REGISTRY="${REGISTRY%/}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)}"
[ -n "$TAG" ] || die "no version in pyproject.toml and TAG not set"

set --
base_note="the Dockerfiles' default base"
if [ "${BASE_IMAGE:-}" = "debootstrap" ]; then
    BASE_IMAGE="$(local_base)"
    WHEELS="${WHEELS:-1}"
fi
if [ -n "${BASE_IMAGE:-}" ]; then
    set -- "$@" --build-arg "BASE_IMAGE=$BASE_IMAGE"
    base_note="$BASE_IMAGE"
fi
if [ "${WHEELS:-0}" = 1 ]; then
    download_wheels
    set -- "$@" --build-arg WHEELS=1
fi

# NO_CACHE=1: every step runs again (no layer of an earlier build is reused)
if [ "${NO_CACHE:-0}" = 1 ]; then
    layers="--no-cache"
    no_cache="--no-cache"
else
    layers="--layers"
    no_cache=""
fi
# podman build reads it too
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
build() {
    image="$REGISTRY/$1:$TAG"
    dockerfile="$2"
    shift 2
    echo "building $image with $ENGINE from $dockerfile on $base_note" >&2
    # shellcheck disable=SC2046,SC2086
    case "$ENGINE" in
        buildah) buildah $(storage_flags) bud $layers -f "$dockerfile" -t "$image" "$@" . ;;
        podman) podman $(storage_flags) build $no_cache -f "$dockerfile" -t "$image" "$@" . ;;
        *) "$ENGINE" build $no_cache -f "$dockerfile" -t "$image" "$@" . ;;
    esac
}
build webhook Dockerfile.webhook "$@"
build sidecar Dockerfile.sidecar "$@"
echo "built $REGISTRY/webhook:$TAG and $REGISTRY/sidecar:$TAG" >&2

if [ "$cmd" = "push" ]; then
    for name in webhook sidecar; do
        image="$REGISTRY/$name:$TAG"
        echo "pushing $image with $ENGINE" >&2
        # shellcheck disable=SC2046
        case "$ENGINE" in
            buildah) buildah $(storage_flags) push "$image" "docker://$image" ;;
            podman) podman $(storage_flags) push "$image" ;;
            *) "$ENGINE" push "$image" ;;
        esac
    done
    echo "pushed $REGISTRY/webhook:$TAG and $REGISTRY/sidecar:$TAG" >&2
fi
