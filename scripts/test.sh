#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs the whole suite (unit tests, gradient
# checks, PyTorch parity, CLI checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
cd build
ctest --output-on-failure --timeout 900 -j1 "$@"
