#!/usr/bin/env bash
# The demo: installs, builds, prepares the State of the Union corpus, trains the tiny Vanilla MoE
# and the tiny LoopMoE for the same number of steps, and prints the comparison.
# DEMO_STEPS (default 600) sets the length of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${DEMO_STEPS:-600}
bash scripts/setup.sh
bash scripts/build.sh
bash scripts/fetch_sotu.sh
if [ ! -f data/sotu/meta.json ]; then
  build/loopmoe data prepare --input data/raw/sotu --vocab 4096 --out data/sotu
fi
rm -rf runs/demo_vanilla runs/demo_loopmoe
build/loopmoe train --config configs/vanilla_tiny.toml --steps "$STEPS" --threads "$(nproc)" --out runs/demo_vanilla
build/loopmoe train --config configs/loopmoe_tiny.toml --steps "$STEPS" --threads "$(nproc)" --out runs/demo_loopmoe
echo
build/loopmoe compare runs/demo_vanilla runs/demo_loopmoe
