#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs the whole suite (unit tests, gradient
# checks, PyTorch parity, CLI checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/deploy_check.sh  # alert rules, manifests, dashboard queries (deploy/)
bash scripts/build.sh
bash scripts/thread_safety_check.sh  # clang -Wthread-safety build of the locking code
cd build
ctest --output-on-failure --timeout 900 -j1 "$@"
