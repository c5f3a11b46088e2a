#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs the whole suite (unit tests, gradient
# checks, PyTorch parity, CLI checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/deploy_check.sh  # alert rules, manifests, dashboard queries (deploy/)
# The image: deploy/Dockerfile built with podman on a debootstrapped Debian 12 base, inspected, and a
# job run in it as the non-root user on a read-only root filesystem (deploy/README.md).
bash scripts/image_check.sh
bash scripts/build.sh
bash scripts/thread_safety_check.sh  # clang -Wthread-safety build of the locking code
bash scripts/fuzz.sh --smoke  # libFuzzer targets (fuzz/) under ASan/UBSan, 20 s each
# The CUDA backend is part of build/ whenever the toolkit is there (model/CMakeLists.txt; no second
# build tree any more), and its tests (Cuda*: the kernels, which skip with a message without a GPU,
# the cuBLAS loader, which executables load the CUDA runtime) run with the rest below. CI must
# compile it, so a build that left it out (no toolkit found) fails here.
grep -q '^LOOPMOE_CUDA:BOOL=ON$' build/CMakeCache.txt ||
  { grep 'model: CUDA' build.log; echo "test: build/ has no CUDA backend (no CUDA toolkit?)"; exit 1; }
# A real Prometheus against `loopmoe cluster up`: every dashboard query returns series, every
# alert rule evaluates (deploy/README.md "Checks").
bash scripts/prometheus_check.sh build
# SIGKILLs of the coordinator, workers and shards at random moments of one job: the final weights
# equal an uninterrupted run's, bit for bit (docs/SERVICE.md "Kill tests"; the short version).
bash scripts/kill_soak.sh
cd build
ctest --output-on-failure --timeout 900 -j1 "$@"
