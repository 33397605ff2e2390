#!/bin/sh
# Installs containerd's hosts.toml for each upstream once the agent answers /readyz, and
# removes it when the pod stops, so containerd never waits on an agent that is not there.
# Environment: REGISTRIES (space-separated hosts), CERTS_D (the host's
# /etc/containerd/certs.d, mounted), MIRROR (default http://127.0.0.1:5001).
set -eu
MIRROR="${MIRROR:-http://127.0.0.1:5001}"
until curl -fsS "$MIRROR/readyz" >/dev/null 2>&1; do sleep 1; done
for registry in $REGISTRIES; do
  mkdir -p "$CERTS_D/$registry"
  sed "s/REGISTRY_HOST/$registry/" /etc/gantry/hosts.toml > "$CERTS_D/$registry/hosts.toml.tmp"
  mv "$CERTS_D/$registry/hosts.toml.tmp" "$CERTS_D/$registry/hosts.toml"
done
cleanup() {
  for registry in $REGISTRIES; do rm -f "$CERTS_D/$registry/hosts.toml"; done
  exit 0
}
trap cleanup TERM INT
while :; do sleep 3600 & wait $!; done
