#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs the whole suite (unit tests, gradient
# checks, PyTorch parity, CLI checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/deploy_check.sh  # alert rules, manifests, dashboard queries (deploy/)
bash scripts/build.sh
bash scripts/thread_safety_check.sh  # clang -Wthread-safety build of the locking code
bash scripts/fuzz.sh --smoke  # libFuzzer targets (fuzz/) under ASan/UBSan, 20 s each
# The CUDA backend (off in build/; model/CMakeLists.txt says why): compiled for sm_90a and its
# tests run, which skip with a message on a machine without a GPU.
cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DLOOPMOE_CUDA=ON -DLOOPMOE_NATIVE=OFF \
  > build-cuda.log 2>&1 || { tail -30 build-cuda.log; exit 1; }
cmake --build build-cuda -j"$(nproc)" --target loopmoe_cuda_tests >> build-cuda.log 2>&1 ||
  { tail -50 build-cuda.log; exit 1; }
(cd build-cuda && ctest --output-on-failure -R "^Cuda")
# A real Prometheus against `loopmoe cluster up`: every dashboard query returns series, every
# alert rule evaluates (deploy/README.md "Checks").
bash scripts/prometheus_check.sh build
cd build
ctest --output-on-failure --timeout 900 -j1 "$@"
