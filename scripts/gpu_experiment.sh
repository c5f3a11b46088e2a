#!/usr/bin/env bash
# One GPU slot of the GPU-scale comparison (issue 10, configs/experiments/gpu.toml). A slot is one
# call of the device tool (/work/.library/device/README.md): a fresh machine, at most 64 MiB
# carried in, at most 8 files of 16 MiB brought back. The experiment runner's --time-limit keeps
# every slot to whole finished runs, so the grid is done in as many slots as the engine's speed
# needs, each continuing from the results of the ones before.
#
# Here (CPU machine, repository root), before a slot:
#   bash scripts/gpu_check.sh --pack        # .gpu-bundle.tar.gz: loopmoe built for the GPU
#   bash scripts/gpu_experiment.sh --pack   # .gpu-data.tar.xz (data/corpus: ~26 MB) and
#                                           # .gpu-results.tar.gz (experiments/gpu so far, no
#                                           # checkpoints)
# The slot (the device tool's run):
#   run(command="bash scripts/gpu_experiment.sh --time-limit 420",
#       carry=[".gpu-bundle.tar.gz", ".gpu-data.tar.xz", ".gpu-results.tar.gz"], timeout_s=540)
# It unpacks the three, runs
#   loopmoe experiment --spec configs/experiments/gpu.toml --device cuda --time-limit N
#       --out experiments/gpu
# and writes $OUT/gpu_experiment_results.tar.gz (the whole experiments/gpu without checkpoints)
# and $OUT/gpu_experiment.log. Back here:
#   bash scripts/gpu_experiment.sh --merge FILES_AT/gpu_experiment_results.tar.gz
# then --pack again for the next slot, until the log says "experiment gpu done"; then
#   loopmoe report --runs experiments/gpu --out docs/results/gpu/REPORT.md
#
# Usage: scripts/gpu_experiment.sh --pack [--data DIR]
#        scripts/gpu_experiment.sh [--time-limit SECONDS] [--spec FILE] [--device cuda[:N]]
#                                  [--bin DIR]   (DIR/loopmoe instead of the bundle's)
#        scripts/gpu_experiment.sh --merge FILE
# Exit: 0 the grid is complete, 3 runs remain (rerun in another slot), 1 an error.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1

mode=run time_limit=420 spec=configs/experiments/gpu.toml device=cuda data=data/corpus merge="" bin=""
out_dir=experiments/gpu
while (($#)); do
  case "$1" in
    --pack) mode=pack; shift ;;
    --merge) mode=merge; merge=$2; shift 2 ;;
    --time-limit) time_limit=$2; shift 2 ;;
    --spec) spec=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_experiment: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
done

# The run directories without what cannot or need not travel: checkpoints (the runner never
# resumes a finished run; an unfinished one restarts from scratch in the next slot).
pack_results() {
  tar czf "$1" --exclude=checkpoint.bin --exclude='*.tmp' "$out_dir"
}

case $mode in
  pack)
    for f in tokenizer.model train.bin val.bin meta.json; do
      [ -f "$data/$f" ] || { echo "gpu_experiment: no $data/$f (loopmoe data prepare, docs/DATA.md)" >&2; exit 1; }
    done
    tar cf - "$data"/{tokenizer.model,train.bin,val.bin,meta.json} | xz -T2 -6 > .gpu-data.tar.xz || exit 1
    if [ -d "$out_dir" ]; then
      pack_results .gpu-results.tar.gz || exit 1
    else
      tar czf .gpu-results.tar.gz --files-from /dev/null || exit 1
    fi
    for f in .gpu-data.tar.xz .gpu-results.tar.gz .gpu-bundle.tar.gz; do
      [ -f "$f" ] && ls -l "$f"
    done
    total=$(du -cb .gpu-data.tar.xz .gpu-results.tar.gz .gpu-bundle.tar.gz 2>/dev/null | tail -1 | cut -f1)
    echo "gpu_experiment: carry $total bytes in all (the device tool takes 64 MiB = 67108864)"
    ((total <= 67108864)) || { echo "gpu_experiment: too much to carry" >&2; exit 1; }
    exit 0 ;;
  merge)
    [ -f "$merge" ] || { echo "gpu_experiment: no $merge" >&2; exit 1; }
    # A later slot's archive holds every earlier run too: unpacking over the old tree is a merge.
    tar xzf "$merge" || exit 1
    done_runs=$(find "$out_dir" -name done | wc -l)
    echo "gpu_experiment: $out_dir now holds $done_runs finished runs"
    exit 0 ;;
esac

mkdir -p "$out_dir"
log=${OUT:-$out_dir}/gpu_experiment.log
say() { echo "gpu_experiment: $*" | tee -a "$log"; }
: > "$log"
nvidia-smi -L 2>&1 | tee -a "$log"
if [ -z "$bin" ]; then
  if [ ! -d .gpu-bundle ] && [ -f .gpu-bundle.tar.gz ]; then tar xzf .gpu-bundle.tar.gz || exit 1; fi
  [ -f .gpu-bundle/env.sh ] || { say "no .gpu-bundle (scripts/gpu_check.sh --pack)"; exit 1; }
  # shellcheck disable=SC1091
  source .gpu-bundle/env.sh
  bin=.gpu-bundle/bin
fi
if [ ! -f "$data/train.bin" ]; then
  [ -f .gpu-data.tar.xz ] || { say "no $data and no .gpu-data.tar.xz"; exit 1; }
  xz -dc .gpu-data.tar.xz | tar xf - || exit 1
fi
if [ -f .gpu-results.tar.gz ]; then tar xzf .gpu-results.tar.gz || exit 1; fi
say "$(find "$out_dir" -name done 2>/dev/null | wc -l) runs finished before this slot"
start=$(date +%s)
"$bin/loopmoe" experiment --spec "$spec" --device "$device" --time-limit "$time_limit" \
  --out "$out_dir" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
say "experiment exit code $rc after $(($(date +%s) - start)) s"
if [ -n "${OUT:-}" ] && [ -d "$out_dir" ]; then
  pack_results "$OUT/gpu_experiment_results.tar.gz"
  ls -l "$OUT/gpu_experiment_results.tar.gz" | tee -a "$log"
fi
exit "$rc"
