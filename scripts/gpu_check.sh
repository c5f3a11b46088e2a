#!/usr/bin/env bash
# The GPU check of issue 9: on a machine with an NVIDIA GPU (an H100: under 6 minutes), from the
# repository root, it runs
#   1. nvidia-smi -L;
#   2. the Cuda* GoogleTest suites (loopmoe_cuda_tests, tests/cuda/), then attention at the
#      gpu_small shape: ours (CudaAttention.TimingAtModelScale's line) beside PyTorch's SDPA
#      backends, cuDNN's fused attention among them (bench/attention_peer.py; $OUT/attention.log);
#   3. loopmoe_bench --device cuda on six cases, one process each (tiny vanilla and tiny LoopMoE at
#      16 and 256 sequences per step, configs/gpu_small_vanilla.toml, configs/gpu_small_loopmoe.toml),
#      and the two gpu_small cases again with LOOPMOE_CUDA_ATTENTION=materialized (the reference
#      attention instead of the fused kernels); the fused gpu_small cases also print their op
#      profile (loopmoe_bench --profile 3: time per ops.h function), which the table shows;
#   4. the PyTorch peer (bench/torch_peer.py --device cuda) on the same cases and GPU: eager,
#      grouped and compile;
# and prints ONE table (bench/gpu_table.py) with the GPU's name and the date. Every command runs
# under `timeout`, capped by what is left of a time budget (--budget, default 330 s); what the
# budget cannot fit is reported as skipped, in this order of priority: tests, ours on every case,
# peer eager, peer grouped, peer compile. Everything it prints also goes to $OUT/gpu_check.log
# when $OUT is set (the device tool brings $OUT's files back), with the table in
# $OUT/gpu_check_table.md and every record in $OUT/gpu_check_raw.jsonl.
#
# ---- How a GPU session uses it (the device tool: /work/.library/device/README.md) ----
# Here, from the repository root (CUDA 13 toolkit, no GPU):
#   cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DLOOPMOE_CUDA=ON -DLOOPMOE_NATIVE=OFF
#   cmake --build build-cuda -j2 --target loopmoe_cuda_tests loopmoe loopmoe_bench
#   bash scripts/gpu_check.sh --pack --build build-cuda
#       # = ../shared/gpu/bundle.sh --build build-cuda --out .gpu-bundle \
#       #     build-cuda/tests/cuda/loopmoe_cuda_tests build-cuda/loopmoe build-cuda/loopmoe_bench
#       #   plus .gpu-bundle/source_dir (this checkout's path, which the tests were built with)
#   grep -qx '/.gpu-bundle.tar.gz' .git/info/exclude || echo /.gpu-bundle.tar.gz >> .git/info/exclude
#   bash scripts/gpu_check.sh --dry-run      # everything but the GPU, on this machine's CPU
# Then one call of the device tool (its `run`), which copies the working tree (scripts/, configs/,
# bench/, tests/reference/ travel with it) and the carried bundle:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu-bundle.tar.gz"], timeout_s=480)
# and give_back unless rerunning at once. The reply's output_tail ends with the table; the files
# come back under files_at.
#
# Usage: scripts/gpu_check.sh [--dry-run] [--budget SECONDS] [--bundle FILE] [--bin DIR]
#                             [--cuda-tests PATH] [--python PY] [--cases "NAME..."]
#        scripts/gpu_check.sh --pack [--build DIR]
#   --dry-run     no GPU call: checks that `loopmoe_bench --device cuda` refuses cleanly, runs the
#                 Cuda* tests (they skip without a device), measures the dry-run cases
#                 (--dry-cases, default the two 16-sequence tiny ones) on the CPU with one step,
#                 prints the plan of the others, and builds the table from that (labelled DRY
#                 RUN). Chosen automatically when nvidia-smi finds no GPU.
#   --bundle FILE the archive of ../shared/gpu/bundle.sh (default .gpu-bundle.tar.gz): unpacked
#                 into .gpu-bundle/ unless that exists, then .gpu-bundle/env.sh is sourced.
#   --bin DIR     take loopmoe_bench (and loopmoe_cuda_tests) from DIR instead of a bundle.
#   --cuda-tests PATH   the test executable (default: loopmoe_cuda_tests on PATH, then
#                 DIR/tests/cuda/loopmoe_cuda_tests).
#   --python PY   the python with torch (default: the first of python3, /usr/bin/python3 that
#                 imports torch).
#   --cases LIST  a subset of the case names below.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1

dry=0 budget=330 bundle=.gpu-bundle.tar.gz bin="" cuda_tests="" python="" pack=0
build=build-cuda only_cases="" dry_cases="tiny_vanilla_16 tiny_loopmoe_16"
while (($#)); do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --budget) budget=$2; shift 2 ;;
    --bundle) bundle=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --cuda-tests) cuda_tests=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --cases) only_cases=$2; shift 2 ;;
    --dry-cases) dry_cases=$2; shift 2 ;;
    --pack) pack=1; shift ;;
    --build) build=$2; shift 2 ;;
    -h|--help) sed -n 2,48p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (--help)" >&2; exit 2 ;;
  esac
done

# ---- --pack: the bundle a GPU session carries ---------------------------------------------------
if ((pack)); then
  bundler=$root/../shared/gpu/bundle.sh
  [ -x "$bundler" ] || [ -f "$bundler" ] || { echo "gpu_check: no $bundler" >&2; exit 1; }
  exes=("$build/tests/cuda/loopmoe_cuda_tests" "$build/loopmoe" "$build/loopmoe_bench")
  for e in "${exes[@]}"; do
    [ -x "$e" ] || { echo "gpu_check: $e is not built (cmake --build $build --target $(basename "$e"))" >&2; exit 1; }
  done
  out=${bundle%.tar.gz}
  bash "$bundler" --build "$build" --out "$out" "${exes[@]}" || exit 1
  # Record the source directory the executables were built with (the Cuda* tests read the configs
  # from it): on the GPU machine the checkout may lie elsewhere, and this script links it there.
  tmp=$(mktemp -d)
  mkdir -p "$tmp/$(basename "$out")"
  echo "$root" > "$tmp/$(basename "$out")/source_dir"
  if ! { gunzip "$out.tar.gz" && tar -rf "$out.tar" -C "$tmp" "$(basename "$out")/source_dir" &&
    gzip "$out.tar"; }; then
    rm -rf "$tmp"
    echo "gpu_check: could not add source_dir to $out.tar.gz" >&2
    exit 1
  fi
  rm -rf "$tmp"
  echo "gpu_check: $out.tar.gz holds the bundle and source_dir ($root); carry it to the device tool"
  exit 0
fi

# ---- output: everything also under $OUT --------------------------------------------------------
outdir=${OUT:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "$outdir" ]; then
  mkdir -p "$outdir"
  exec > >(tee -a "$outdir/gpu_check.log") 2>&1
  raw=$outdir/gpu_check_raw.jsonl
else
  raw=$work/gpu_check_raw.jsonl
fi
: > "$raw"
start=$SECONDS
bad=0
say() { echo "gpu_check [$((SECONDS - start))s]: $*"; }

# ---- the executables ----------------------------------------------------------------------------
if [ -z "$bin" ]; then
  if [ ! -d .gpu-bundle ] && [ -f "$bundle" ]; then
    say "unpacking $bundle"
    tar xzf "$bundle" || { say "cannot unpack $bundle"; exit 1; }
  fi
  if [ -f .gpu-bundle/env.sh ]; then
    # shellcheck disable=SC1091
    source .gpu-bundle/env.sh
    bin=.gpu-bundle/bin
  elif [ -x "$build/loopmoe_bench" ]; then
    bin=$build
  else
    say "no bundle ($bundle), no .gpu-bundle/ and no $build/loopmoe_bench: see the comment at the top of $0"
    exit 1
  fi
fi
bench=$bin/loopmoe_bench
[ -x "$bench" ] || { say "no executable $bench"; exit 1; }
if [ -z "$cuda_tests" ]; then
  for c in "$bin/loopmoe_cuda_tests" "$bin/tests/cuda/loopmoe_cuda_tests"; do
    [ -x "$c" ] && { cuda_tests=$c; break; }
  done
fi
# The tests read configs from the source directory they were built in: make it exist here.
if [ -f .gpu-bundle/source_dir ]; then
  built_in=$(cat .gpu-bundle/source_dir)
  if [ "$built_in" != "$root" ] && [ ! -e "$built_in/configs/vanilla_tiny.toml" ]; then
    if ((dry)); then
      say "dry run: would link $built_in -> $root (the tests' source directory)"
    elif mkdir -p "$(dirname "$built_in")" && ln -sfn "$root" "$built_in"; then
      say "linked $built_in -> $root (the source directory the tests were built in)"
    else
      say "cannot link $built_in -> $root: the CudaModel tests may not find the configs"
    fi
  fi
fi

if [ -z "$python" ]; then
  for p in python3 /usr/bin/python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import torch' 2>/dev/null; then python=$p; break; fi
  done
  [ -n "$python" ] || { say "no python3 with torch found (--python)"; exit 1; }
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# ---- GPU or dry run -----------------------------------------------------------------------------
if ((!dry)); then
  if ! command -v nvidia-smi >/dev/null || ! timeout 30 nvidia-smi -L >"$work/smi" 2>&1 ||
    ! grep -q '^GPU ' "$work/smi"; then
    say "no GPU found by nvidia-smi: dry run"
    dry=1
  fi
fi
jstr() { "$python" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
record() {  # record CASE SOURCE VARIANT STATUS RC SECONDS DETAIL
  printf '{"case": %s, "source": "%s", "variant": "%s", "status": "%s", "rc": %s, "seconds": %s, "detail": %s}\n' \
    "$(jstr "$1")" "$2" "$3" "$4" "$5" "$6" "$(jstr "$7")" >> "$raw"
}
record_json_lines() {  # record_json_lines CASE SOURCE VARIANT FILE: each JSON line FILE holds
  grep '^{' "$4" | while IFS= read -r line; do
    printf '{"case": %s, "source": "%s", "variant": "%s", "data": %s}\n' "$(jstr "$1")" "$2" "$3" \
      "$line" >> "$raw"
  done
}
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
printf '{"source": "meta", "data": {"date": %s, "commit": %s, "host": %s, "dry_run": %s}}\n' \
  "$(jstr "$(date -u '+%Y-%m-%d %H:%M UTC')")" "$(jstr "$commit")" "$(jstr "$(hostname)")" \
  "$( ((dry)) && echo true || echo false)" >> "$raw"
say "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, bench $bench, python $python ($("$python" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)), budget ${budget}s$( ((dry)) && echo ', DRY RUN')"

# run_item TIMEOUT LOG CMD...: runs CMD under `timeout`, capped by what is left of the budget;
# sets rc (124: timed out or no time left) and took (seconds).
run_item() {
  local limit=$1 log=$2; shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < 10)); then rc=125; took=0; : > "$log"; return; fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  echo "+ $*" | cut -c1-400
  timeout -k 10 "$limit" "$@" > "$log" 2> "$log.err"
  rc=$?
  cat "$log.err" >&2
  took=$((SECONDS - t0))
}
status_of() {  # status_of RC
  case "$1" in 0) echo ok ;; 124|137) echo timeout ;; 125) echo skipped ;; *) echo failed ;; esac
}
last_error() {  # the last non-empty stderr line of a log, for the notes
  [ "$1" = 125 ] && { echo "no time left in the ${budget}s budget"; return; }
  [ "$1" = 124 ] || [ "$1" = 137 ] && { echo "stopped by timeout"; return; }
  grep -v '^\s*$' "$2.err" 2>/dev/null | tail -1 | cut -c1-300
}

# ---- 1. the GPU ---------------------------------------------------------------------------------
if ((dry)); then
  say "dry run: would run nvidia-smi -L"
else
  cat "$work/smi"
fi

# ---- 2. the Cuda* tests -------------------------------------------------------------------------
if [ -n "$cuda_tests" ]; then
  say "Cuda* tests: $cuda_tests"
  run_item 150 "$work/tests.log" "$cuda_tests" --gtest_filter='Cuda*' --gtest_color=no
  cat "$work/tests.log"
  [ -n "$outdir" ] && cp "$work/tests.log" "$outdir/cuda_tests.log"
  passed=$(grep -Eo '^\[  PASSED  \] [0-9]+' "$work/tests.log" | grep -Eo '[0-9]+$' || true)
  skipped=$(grep -Eo '^\[  SKIPPED \] [0-9]+ test' "$work/tests.log" | grep -Eo '[0-9]+' | head -1 || true)
  failed=$(grep -Eo '^\[  FAILED  \] [0-9]+ test' "$work/tests.log" | grep -Eo '[0-9]+' | head -1 || true)
  total=$(grep -Eo '^\[==========\] [0-9]+ tests? from [0-9]+ test suites? ran' "$work/tests.log" |
    grep -Eo '^\[==========\] [0-9]+' | grep -Eo '[0-9]+$' || true)
  summary="${total:-?} run: ${passed:-0} passed, ${skipped:-0} skipped, ${failed:-0} failed"
  [ "$rc" = 125 ] && summary="not run"
  why=$(last_error "$rc" "$work/tests.log")
  [ "$rc" = 0 ] || [ -z "$why" ] || summary="$summary; $why"
  record "" tests "" "$(status_of "$rc")" "$rc" "$took" "$summary"
  [ "$rc" = 0 ] || bad=1
  say "Cuda* tests: $summary (exit $rc)"
else
  record "" tests "" failed 127 0 "no loopmoe_cuda_tests (--cuda-tests PATH, or a bundle that has it)"
  bad=1
  say "no loopmoe_cuda_tests found: --cuda-tests PATH"
fi

# ---- 2b. attention: our fused kernels and PyTorch's backends on one shape -------------------------
# Issue 9 asks for our attention beside cuDNN's fused attention: CudaAttention.TimingAtModelScale
# (in the tests above) printed ours at the gpu_small shape; bench/attention_peer.py times
# PyTorch's scaled_dot_product_attention pinned to each backend (cuDNN, flash, efficient, math)
# and a written-out one on the same shape. Printed here and kept in attention.log; not in the
# table, and a failure here fails nothing (it is a measurement, not a check).
say "attention at the gpu_small shape (16 x 1024 tokens, 12 heads of 64), forward + backward:"
grep -h '^attention at model scale' "$work/tests.log" 2>/dev/null || say "  (no timing from the Cuda* tests)"
if ((dry)); then
  run_item 60 "$work/attention.log" "$python" bench/attention_peer.py --device cpu --batch 1 \
    --seq-len 64 --heads 2 --head-dim 16 --dtype fp32 --repeats 1
else
  run_item 45 "$work/attention.log" "$python" bench/attention_peer.py --device cuda --batch 16 \
    --seq-len 1024 --heads 12 --head-dim 64 --dtype bf16 --repeats 3
fi
cat "$work/attention.log"
say "attention_peer: $(status_of "$rc") (exit $rc)$( [ "$rc" = 0 ] || echo "; $(last_error "$rc" "$work/attention.log")")"
if [ -n "$outdir" ]; then
  { grep -h '^attention at model scale' "$work/tests.log" 2>/dev/null; cat "$work/attention.log"; } \
    > "$outdir/attention.log"
fi

# ---- 3 and 4. the benchmark ---------------------------------------------------------------------
# name config sequences-per-step
all_cases=(
  "tiny_vanilla_16 configs/vanilla_tiny.toml 16"
  "tiny_vanilla_256 configs/vanilla_tiny.toml 256"
  "tiny_loopmoe_16 configs/loopmoe_tiny.toml 16"
  "tiny_loopmoe_256 configs/loopmoe_tiny.toml 256"
  "gpu_small_vanilla configs/gpu_small_vanilla.toml 16"
  "gpu_small_loopmoe configs/gpu_small_loopmoe.toml 16"
  # Ours only, with the materialized attention instead of the fused kernels (the fused kernels'
  # gain, measured in the same run): name config sequences environment.
  "gpu_small_vanilla_materialized configs/gpu_small_vanilla.toml 16 LOOPMOE_CUDA_ATTENTION=materialized"
  "gpu_small_loopmoe_materialized configs/gpu_small_loopmoe.toml 16 LOOPMOE_CUDA_ATTENTION=materialized"
)
cases=()
for c in "${all_cases[@]}"; do
  name=${c%% *}
  if [ -z "$only_cases" ] || [[ " $only_cases " == *" $name "* ]]; then cases+=("$c"); fi
done
steps=(--steps 20 --warmup 2 --max-seconds 5)  # per case: at most ~5 s of timed steps
# Ours in bf16 (bf16 products, fp32 accumulation and masters): what the peer's bf16 autocast does.
# The fp32 engine is held to the CPU by the Cuda* tests above.
precision=bf16
dry_steps=(--steps 1 --warmup 0)
measured() {  # whether a dry run measures this case on the CPU
  ((!dry)) || [[ " $dry_cases " == *" $1 "* ]]
}

if ((dry)); then
  say "dry run: loopmoe_bench --device cuda must refuse in one line"
  "$bench" --device cuda --config configs/vanilla_tiny.toml --no-torch > "$work/refuse.log" 2>&1
  rc=$?
  cat "$work/refuse.log"
  if [ "$rc" = 1 ] && [ "$(wc -l < "$work/refuse.log")" = 1 ] && grep -q '^error: ' "$work/refuse.log"; then
    say "ok: exit 1 with one error line"
  else
    say "UNEXPECTED: exit $rc (a machine with a GPU? then run without --dry-run)"
  fi
fi

for c in "${cases[@]}"; do
  read -r name config batch environment <<< "$c"
  with_env=()
  [ -n "$environment" ] && with_env=(env "$environment")
  "$bench" --plan --json --config "$config" --batch "$batch" > "$work/plan.log" 2>&1 &&
    record_json_lines "$name" plan "" "$work/plan.log"
  if ! measured "$name"; then
    say "$name: dry run: not measured on the CPU (would run: loopmoe_bench --device cuda --config $config --batch $batch --precision $precision ${steps[*]} --no-torch --json)"
    record "$name" ours "" skipped 125 0 "dry run: not measured on the CPU"
    continue
  fi
  if ((dry)); then  # with a one-step op profile, so that its path to the table is exercised
    run_item 300 "$work/ours.log" "${with_env[@]}" "$bench" --device cpu --threads 1 \
      --config "$config" --batch "$batch" --precision "$precision" "${dry_steps[@]}" \
      --profile 1 --no-torch --json
  else
    profile=()  # the op profile of the GPU-scale cases (3 more steps, in the table)
    [[ $name == gpu_small* && -z $environment ]] && profile=(--profile 3)
    run_item 90 "$work/ours.log" "${with_env[@]}" "$bench" --device cuda --config "$config" \
      --batch "$batch" --precision "$precision" "${steps[@]}" "${profile[@]}" --no-torch --json
  fi
  cat "$work/ours.log"
  record_json_lines "$name" ours "" "$work/ours.log"
  record "$name" ours "" "$(status_of "$rc")" "$rc" "$took" "$(last_error "$rc" "$work/ours.log")"
  [ "$rc" = 0 ] || [ "$rc" = 125 ] || bad=1
done

peer_limit() {  # seconds a peer run may take
  case "$1" in compile) echo 150 ;; *) echo 90 ;; esac
}
compile_order=()  # compile: the GPU-scale cases first
for c in "${cases[@]}"; do [[ $c == gpu_small* ]] && compile_order+=("$c"); done
for c in "${cases[@]}"; do [[ $c == gpu_small* ]] || compile_order+=("$c"); done
for variant in eager grouped compile; do
  list=("${cases[@]}")
  [ "$variant" = compile ] && list=("${compile_order[@]}")
  for c in "${list[@]}"; do
    read -r name config batch environment <<< "$c"
    [ -n "$environment" ] && continue  # a variant of ours: no peer of its own
    if ! measured "$name"; then
      record "$name" peer "$variant" skipped 125 0 "dry run: not measured on the CPU"
      continue
    fi
    if ((dry)); then
      run_item 300 "$work/peer.log" "$python" bench/torch_peer.py --config "$config" --batch "$batch" \
        --threads 1 --variant "$variant" "${dry_steps[@]}" --json
    else
      run_item "$(peer_limit "$variant")" "$work/peer.log" "$python" bench/torch_peer.py \
        --device cuda --config "$config" --batch "$batch" --threads 8 --variant "$variant" \
        "${steps[@]}" --json
    fi
    cat "$work/peer.log"
    record_json_lines "$name" peer "$variant" "$work/peer.log"
    record "$name" peer "$variant" "$(status_of "$rc")" "$rc" "$took" "$(last_error "$rc" "$work/peer.log")"
  done
done

# ---- the table ----------------------------------------------------------------------------------
say "done in $((SECONDS - start)) s; the table:"
echo
table_args=("$raw")
((dry)) && table_args+=(--dry-run)
"$python" bench/gpu_table.py "${table_args[@]}" > "$work/table.md"
cat "$work/table.md"
[ -n "$outdir" ] && cp "$work/table.md" "$outdir/gpu_check_table.md"
# Exit 1 when a test or one of our own benchmark runs failed or timed out (the peer's failures
# are in the table's notes only).
exit $bad
