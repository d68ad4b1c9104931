#!/usr/bin/env bash
# make image: build the container images (runtime, and with TARGETS=... others) on a machine that
# may not be able to pull any image.
#
#   scripts/image.sh                         # nann-retrieval:latest (target runtime)
#   TARGETS="runtime loadtest trainer" scripts/image.sh
#
# BASE_IMAGE: the image to build on (default python:3.11-slim). If it is neither present nor
# pullable, a local base is made with debootstrap (Debian bookworm minbase with python3,
# python3-venv and ca-certificates; needs root and the debootstrap package) and imported as
# nann-base:bookworm. PIP_CA: a CA bundle pip inside the build needs (default: the machine's,
# /etc/ssl/certs/ca-certificates.crt, where present); it stays in the dependency stages.
# Builds use the host network (--network host), as on machines whose Docker engine runs
# without a bridge.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
LOCAL_BASE="nann-base:bookworm"
TARGETS="${TARGETS:-runtime}"
PIP_CA="${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}"

if ! docker info >/dev/null 2>&1; then
    echo "no Docker engine answers: start one (e.g. dockerd --bridge=none --iptables=false" \
        "--ip-forward=false --ip-masq=false) and retry" >&2
    exit 1
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && ! docker pull "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "base image $BASE_IMAGE is not here and cannot be pulled: using $LOCAL_BASE"
    BASE_IMAGE="$LOCAL_BASE"
    if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || { echo "install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
        rootfs="$(mktemp -d)"
        trap 'rm -rf "$rootfs"' EXIT
        echo "debootstrap bookworm into $rootfs (a few minutes)"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
            >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | docker import - "$LOCAL_BASE" >/dev/null
        rm -f "$rootfs.log"
        echo "imported $LOCAL_BASE"
    fi
fi

mkdir -p .docker-build
rm -f .docker-build/pip-ca.crt
if [ -f "$PIP_CA" ]; then cp "$PIP_CA" .docker-build/pip-ca.crt; fi

for target in $TARGETS; do
    case "$target" in
        runtime) tag="nann-retrieval:latest" ;;
        *) tag="nann-$target:latest" ;;
    esac
    echo "building $tag (target $target, base $BASE_IMAGE)"
    docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" --target "$target" -t "$tag" .
done
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^nann-' || true
