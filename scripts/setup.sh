#!/usr/bin/env bash
# Installs everything phaul needs on a Debian bookworm host, idempotently:
# Debian packages, CRIU >= 4.2 (built from Debian's source when needed),
# the project's .venv with pycriu and the static workload programs (the
# compiled agent protocol is committed: `make proto` regenerates it). Quick when nothing is missing.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
log() { echo "setup: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "run as root (phaul drives CRIU, runc and network namespaces)"; exit 1; }

APT_PACKAGES=(
    runc rsync iptables busybox-static socat iproute2 tcpdump procps kmod
    build-essential pkg-config protobuf-compiler libprotobuf-dev libprotobuf-c-dev
    protobuf-c-compiler libnl-3-dev libnet1-dev libcap-dev uuid-dev python3-venv
    libbsd-dev libnftables-dev libgnutls28-dev
    mmdebstrap umoci skopeo acl attr libcap2-bin
    redis-tools wrk curl
    openssh-server openssh-client
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

criu_tree=$(scripts/build-criu.sh)

PY=${PYTHON:-python3}
stamp="$(sha256sum pyproject.toml | cut -c1-16) $criu_tree"
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.phaul-stamp 2>/dev/null)" != "$stamp" ]; then
    log "creating .venv"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test,bench]'
    # pycriu from the same CRIU tree; protoc is grpcio-tools' own so the
    # generated code matches the protobuf runtime grpcio uses.
    wrap=$(mktemp -d)
    printf '#!/bin/sh\nexec %s -m grpc_tools.protoc "$@"\n' "$PWD/.venv/bin/python" > "$wrap/protoc"
    chmod +x "$wrap/protoc"
    PATH="$wrap:$PATH" make -C "$criu_tree" lib >"$criu_tree/lib-build.log" 2>&1 \
        || { tail -20 "$criu_tree/lib-build.log" >&2; rm -rf "$wrap"; exit 1; }
    rm -rf "$wrap"
    .venv/bin/pip install -q --no-build-isolation "$criu_tree/lib" 2>>"$criu_tree/lib-build.log"
    echo "$stamp" > .venv/.phaul-stamp
fi

make -s -C workloads
log "ready: $(criu --version | head -1), $(runc --version | head -1), $(.venv/bin/python --version)"
