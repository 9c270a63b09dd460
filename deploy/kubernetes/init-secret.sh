#!/usr/bin/env bash
# Once per cluster: the CA, the certificates of mandate-0..2 (named as the headless Service
# names them, in namespace ${NAMESPACE:-default}) and a key-encryption key in ${1:-./tls}, then
# the Secret `mandate-tls` that the StatefulSet mounts. Keep ca-key.pem out of the cluster.
set -euo pipefail
dir="${1:-./tls}"
ns="${NAMESPACE:-default}"
mandate="${MANDATE:-mandate}"
nodes=()
for k in 0 1 2; do
    host="mandate-$k.mandate-peer"
    nodes+=(--node "$((k + 1))=$host,$host.$ns,$host.$ns.svc,$host.$ns.svc.cluster.local")
done
"$mandate" tls init --dir "$dir" "${nodes[@]}" >/dev/null
if [ ! -e "$dir/kek" ]; then
    (umask 077; od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' > "$dir/kek")
fi
kubectl -n "$ns" create secret generic mandate-tls \
    --from-file=ca.pem="$dir/ca.pem" --from-file=kek="$dir/kek" \
    $(for id in 1 2 3; do echo "--from-file=node-$id.pem=$dir/node-$id.pem --from-file=node-$id-key.pem=$dir/node-$id-key.pem"; done)
