#!/bin/sh
# Build Shop's image with podman where no container registry is reachable (docs/deploy.md):
# the base is a local Debian bookworm image made by mmdebstrap (python3, python3-venv and
# ca-certificates, ~225 MB, ~35-100 s, once per machine), then deploy/Dockerfile on top.
#
#   deploy/build-image.sh                   # -> localhost/shop:latest
#
# SHOP_IMAGE names the result, SHOP_BASE_IMAGE the base, SHOP_BUILD_CA_BUNDLE the CA bundle
# mounted read-only into the build so pip trusts this network's proxy (never copied in).
# Needs Debian's podman, runc and mmdebstrap; settings come from deploy/podman/containers.conf
# unless CONTAINERS_CONF names another file.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
CONTAINERS_CONF=${CONTAINERS_CONF:-$root/deploy/podman/containers.conf}
export CONTAINERS_CONF
base=${SHOP_BASE_IMAGE:-localhost/shop-base:bookworm}
image=${SHOP_IMAGE:-localhost/shop:latest}
ca=${SHOP_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if ! podman image exists "$base"; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$scratch/rootfs.tar"
    podman import --quiet "$scratch/rootfs.tar" "$base" >/dev/null
fi

# The image this build replaces, removed once the new one is tagged (it would stay as an
# untagged copy of every dependency). The build stage's layers stay: they are the cache that
# lets the next build reuse the dependency layer (docs/deploy.md).
previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)

# --format docker keeps the HEALTHCHECK (the OCI format has none); --network host: the
# build's pip reaches the package index the way the host does.
podman build --quiet --format docker --network host \
    --file "$root/deploy/Dockerfile" --ignorefile "$root/deploy/Dockerfile.dockerignore" \
    --build-arg "BASE_IMAGE=$base" --volume "$ca:$ca:ro" \
    --tag "$image" "$root" >/dev/null
current=$(podman image inspect --format '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman image rm "$previous" >/dev/null 2>&1 || true # still used by a container: kept
fi
echo "built $image from $base"
