#!/usr/bin/env bash
# Builds the image `${2:-mandate:local}` FROM scratch out of the binary $1 (default: the release
# build) and the shared libraries it links, with no registry. Prints the image id.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="${1:-$here/../target/release/mandate}"
tag="${2:-mandate:local}"
[ -x "$binary" ] || { echo "no executable at $binary (cargo build --release -p mandate-cli)" >&2; exit 1; }
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs/usr/local/bin" "$context/rootfs/var/lib" "$context/rootfs/etc/mandate/tls" "$context/data"
cp "$binary" "$context/rootfs/usr/local/bin/mandate"
# Every library the binary loads, and the dynamic loader, at the paths it was linked against.
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
    mkdir -p "$context/rootfs$(dirname "$lib")"
    cp -L "$lib" "$context/rootfs$lib"
done
cp "$here/Dockerfile.local" "$context/Dockerfile"
docker build --quiet --tag "$tag" "$context"
