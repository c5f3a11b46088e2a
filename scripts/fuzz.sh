#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with Clang, ASan and UBSan in build-fuzz/ and runs each on a
# copy of its seed corpus for a set time (docs/FUZZING.md). One line per target; exits 1 on any
# crash, leak, timeout, out-of-memory or sanitizer report, keeping the input under
# build-fuzz/crashes/<target>/ and printing the command that reproduces it.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: scripts/fuzz.sh [--smoke] [--seconds N] [--parallel N] [--merge] [target...]

Builds the fuzz targets (Clang, -fsanitize=fuzzer,address,undefined) in build-fuzz/ and runs each
named target (default: all) for N seconds on a copy of its seed corpus fuzz/corpus/<target>/.

  --smoke      20 seconds per target (CI: every target; about 80 s on 2 cores after the build)
  --seconds N  seconds per target (default 60; --smoke sets 20)
  --parallel N targets run at once, one core each (default: nproc)
  --merge      afterwards, add the inputs that found new coverage to fuzz/corpus/<target>/
               (libFuzzer -merge=1); without it the repository is never written to
  --help       this text

Targets: config_fuzzer job_spec_fuzzer submit_job_fuzzer token_shard_fuzzer checkpoint_fuzzer
         process_checkpoint_fuzzer training_process_fuzzer
Environment: LOOPMOE_FUZZ_BUILD_DIR (default build-fuzz), LOOPMOE_FUZZ_JOBS (build jobs,
default nproc). A finding is kept as <build>/crashes/<target>/<kind>-<sha1>; run the printed
command to reproduce it with the target's full output.
EOF
}

all_targets=(config_fuzzer job_spec_fuzzer submit_job_fuzzer token_shard_fuzzer checkpoint_fuzzer
  process_checkpoint_fuzzer training_process_fuzzer)
seconds=60
merge=0
parallel=$(nproc)
targets=()
while (($#)); do
  case "$1" in
    --smoke) seconds=20 ;;
    --seconds)
      [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: --seconds needs a positive integer" >&2; exit 2; }
      seconds="$2"
      shift
      ;;
    --merge) merge=1 ;;
    --parallel)
      [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: --parallel needs a positive integer" >&2; exit 2; }
      parallel="$2"
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "fuzz: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      [[ " ${all_targets[*]} " == *" $1 "* ]] || { echo "fuzz: unknown target $1 (see --help)" >&2; exit 2; }
      targets+=("$1")
      ;;
  esac
  shift
done
((${#targets[@]})) || targets=("${all_targets[@]}")

dir="${LOOPMOE_FUZZ_BUILD_DIR:-build-fuzz}"
jobs="${LOOPMOE_FUZZ_JOBS:-$(nproc)}"
log="$dir/fuzz-build.log"
start=$SECONDS
if ! command -v clang++ >/dev/null 2>&1; then
  echo "fuzz: FAILED (no clang++; scripts/setup.sh installs clang)"
  exit 1
fi
mkdir -p "$dir"
if [[ -f "$dir/CMakeCache.txt" ]] && ! grep -q '^CMAKE_CXX_COMPILER:.*clang' "$dir/CMakeCache.txt"; then
  echo "fuzz: FAILED ($dir is configured with another compiler; remove it)"
  exit 1
fi
# Configure once (later builds re-run CMake themselves when a CMakeLists.txt changes), then build
# only the fuzz targets: the option instruments every library, so nothing else belongs here.
if ! { { [[ -f "$dir/CMakeCache.txt" ]] ||
  CC=clang CXX=clang++ cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOOPMOE_FUZZ=ON \
    -DLOOPMOE_NATIVE=OFF -DLOOPMOE_CUDA=OFF -DLOOPMOE_COMM_NCCL=OFF; } &&
  cmake --build "$dir" -j"$jobs" --target "${targets[@]}"; } >"$log" 2>&1; then
  tail -40 "$log"
  echo "fuzz: FAILED (build; $log)"
  exit 1
fi
echo "fuzz: built ${#targets[@]} target(s) in $((SECONDS - start)) s ($log)"

# Any report stops the run: UBSan aborts (-fno-sanitize-recover), ASan and LeakSanitizer are on.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
work="$dir/fuzz-work"
# The file-format targets write each input to a scratch file: on tmpfs they run ~25x faster.
scratch_base=/tmp
[[ -d /dev/shm && -w /dev/shm ]] && scratch_base=/dev/shm
scratch="$(mktemp -d "$scratch_base/loopmoe-fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
# fuzz_one TARGET: one libFuzzer run; its line(s) go to $work/TARGET/report, and a failure also
# leaves $work/TARGET/failed.
fuzz_one() {
  local t="$1"
  local seeds="fuzz/corpus/$t" corpus="$work/$t/corpus" crashes="$dir/crashes/$t"
  local out="$work/$t/fuzz.log" report="$work/$t/report"
  local dict=() rc=0 before after runs cov ft corp newest
  case "$t" in config_fuzzer | job_spec_fuzzer) dict=(-dict=fuzz/toml.dict) ;; esac
  before=$(find "$crashes" -type f | wc -l)
  # -close_fd_mask=3: the target's own stdout/stderr (the servers' log lines) are dropped;
  # libFuzzer's output and every sanitizer report still reach the log.
  TMPDIR="$scratch" "$dir/fuzz/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -close_fd_mask=3 -print_final_stats=1 -artifact_prefix="$crashes/" "${dict[@]}" "$corpus" \
    >"$out" 2>&1 || rc=$?
  # (A crash in the seeds ends the run before libFuzzer prints coverage.)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
  cov=$( (grep -o 'cov: [0-9]*' "$out" || true) | tail -1 | cut -d' ' -f2)
  ft=$( (grep -o 'ft: [0-9]*' "$out" || true) | tail -1 | cut -d' ' -f2)
  corp=$(find "$corpus" -type f | wc -l)
  after=$(find "$crashes" -type f | wc -l)
  if ((rc != 0)) || ((after > before)) ||
    grep -qE '^==[0-9]+==ERROR|runtime error:|^SUMMARY: |fuzz check failed' "$out"; then
    touch "$work/$t/failed"
    {
      printf 'fuzz: %-26s runs %-9s cov %-6s ft %-6s corpus %-5s FAILED (exit %s; log %s)\n' \
        "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$corp" "$rc" "$out"
      { grep -E '^==[0-9]+==ERROR|runtime error:|^SUMMARY: |fuzz check failed' "$out" || true; } |
        head -6 | sed 's/^/      /'
      newest=$(find "$crashes" -type f -printf '%T@ %f\n' | sort -n | tail -1 | cut -d' ' -f2)
      if [[ -n "$newest" ]]; then
        echo "      input kept: $crashes/$newest"
        echo "      reproduce:  $dir/fuzz/$t $crashes/$newest"
      fi
    } >"$report"
  else
    printf 'fuzz: %-26s runs %-9s cov %-6s ft %-6s corpus %-5s ok (%s s)\n' \
      "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$corp" "$seconds" >"$report"
  fi
  if ((merge)); then
    "$dir/fuzz/$t" -merge=1 -close_fd_mask=3 "$seeds" "$corpus" >"$work/$t/merge.log" 2>&1 || {
      echo "fuzz: merge of $t FAILED ($work/$t/merge.log)" >>"$report"
      touch "$work/$t/failed"
    }
  fi
}

# Each target on a fresh copy of its seeds, `parallel` at a time (one core each).
running=0
for t in "${targets[@]}"; do
  rm -rf "${work:?}/$t"
  mkdir -p "$work/$t/corpus" "$dir/crashes/$t"
  cp "fuzz/corpus/$t"/* "$work/$t/corpus"/
  fuzz_one "$t" &
  if ((++running >= parallel)); then
    wait -n
    running=$((running - 1))
  fi
done
wait
failed=0
for t in "${targets[@]}"; do
  cat "$work/$t/report"
  [[ -e "$work/$t/failed" ]] && failed=1
done
if ((failed)); then
  echo "fuzz: FAILED ($((SECONDS - start)) s in all)"
  exit 1
fi
echo "fuzz: ok (${#targets[@]} target(s), $seconds s each, $parallel at a time, $((SECONDS - start)) s in all)"
