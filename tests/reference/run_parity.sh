#!/usr/bin/env bash
# run_parity.sh DUMP_TOOL PYTHON OUT_DIR [dump options...]: dump from C++, recompute in PyTorch.
set -euo pipefail
dump=$1 py=$2 out=$3
shift 3
rm -rf "$out" && mkdir -p "$out"
"$dump" --out "$out" "$@"
exec "$py" "$(dirname "$0")/check_parity.py" "$out"
