#!/usr/bin/env bash
# Once per cluster: the CA and node certificates (valid for the service names and for
# 127.0.0.1, where the host reaches the published ports) and the key-encryption key, in
# ${1:-deploy/tls}, readable by the image's user (uid 10001). Run as root, or chown yourself.
# MANDATE (default: mandate on PATH) is the binary that makes them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/tls}"
mandate="${MANDATE:-mandate}"
"$mandate" tls init --dir "$dir" \
    --node 1=mandate-1,localhost,127.0.0.1 \
    --node 2=mandate-2,localhost,127.0.0.1 \
    --node 3=mandate-3,localhost,127.0.0.1 >/dev/null
if [ ! -e "$dir/kek" ]; then
    (umask 077; od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' > "$dir/kek")
fi
# The CA key signs node certificates; the nodes never need it. Keep it elsewhere.
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "$dir"/node-*-key.pem "$dir/kek"
else
    echo "make $dir/node-*-key.pem and $dir/kek readable by uid 10001 (the image's user)" >&2
fi
echo "$dir"
