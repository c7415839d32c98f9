#!/bin/sh
# Builds the two release images with whatever container engine runs here.
#   sh scripts/build-images.sh               build ghcr.io/modelcache/{webhook,sidecar}:<version>
#   sh scripts/build-images.sh lock-runtime  re-resolve requirements-runtime.lock (hash-pinned
#                                            runtime dependencies only: what the images install)
# Environment: REGISTRY (default ghcr.io/modelcache), TAG (default: version in pyproject.toml),
# ENGINE (docker|podman|buildah; default: the first one that answers).
# The tag must match the sidecarImage in manifests/core/configmap.yaml and the webhook image in
# manifests/core/deployment.yaml (a test checks the manifests against pyproject's version).
set -eu
cd "$(dirname "$0")/.."

if [ "${1:-}" = "lock-runtime" ]; then
    exec uv pip compile pyproject.toml --generate-hashes --python-version 3.11 --no-header \
        -o requirements-runtime.lock
fi
if [ $# -gt 0 ]; then
    echo "usage: $0 [lock-runtime]" >&2
    exit 2
fi

REGISTRY="${REGISTRY:-ghcr.io/modelcache}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)}"
[ -n "$TAG" ] || { echo "error: no version in pyproject.toml and TAG not set" >&2; exit 1; }

# A client binary alone is not enough (e.g. a docker CLI without a daemon): ask it.
engine_works() {
    case "$1" in
        docker) command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 ;;
        podman) command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1 ;;
        buildah) command -v buildah >/dev/null 2>&1 && buildah info >/dev/null 2>&1 ;;
        *) return 1 ;;
    esac
}

ENGINE="${ENGINE:-}"
if [ -z "$ENGINE" ]; then
    for candidate in docker podman buildah; do
        if engine_works "$candidate"; then ENGINE="$candidate"; break; fi
    done
fi
if [ -z "$ENGINE" ] || ! engine_works "$ENGINE"; then
    echo "error: no container engine: none of docker, podman, buildah answers here" \
         "(a docker client without a running daemon does not count); images not built" >&2
    exit 1
fi

build() {
    image="$REGISTRY/$1:$TAG"
    echo "building $image with $ENGINE from $2" >&2
    case "$ENGINE" in
        buildah) buildah bud --layers -f "$2" -t "$image" . ;;
        *) "$ENGINE" build -f "$2" -t "$image" . ;;
    esac
}
build webhook Dockerfile.webhook
build sidecar Dockerfile.sidecar
echo "built $REGISTRY/webhook:$TAG and $REGISTRY/sidecar:$TAG" >&2
