#!/bin/sh
# ctest bench.cli: loopmoe_bench's command-line checks, which measure nothing.
#   sh bench/bench_cli_test.sh BUILD/loopmoe_bench SOURCE_DIR
# 1. --device cuda:99 fails with exit code 1 and one line "error: ... no CUDA device ...": in a build
#    without CUDA, on a machine without a GPU, and on a GPU machine (which has no device 99).
# 2. --device gpu (malformed) fails likewise, naming the accepted forms.
# 3. --plan reads the four benchmark configs at 16 and 256 sequences and prints their analytic
#    budget.
set -u
bench=$1 src=$2
tiny=$src/configs/vanilla_tiny.toml
fail=0
expect_error() {  # expect_error REGEX ARGS...: exit code 1 and exactly one line matching REGEX
  regex=$1; shift
  out=$("$bench" "$@" 2>&1); rc=$?
  lines=$(printf '%s\n' "$out" | wc -l)
  if [ "$rc" -eq 1 ] && [ "$lines" -eq 1 ] && printf '%s\n' "$out" | grep -Eq "$regex"; then
    echo "ok: loopmoe_bench $*: $out"
  else
    echo "FAILED: loopmoe_bench $* (exit $rc, $lines lines; expected exit 1 and one line matching '$regex'):"
    printf '%s\n' "$out"
    fail=1
  fi
}
expect_error '^error: .*no CUDA device' --device cuda:99 --config "$tiny" --no-torch
expect_error '^error: --device gpu: expected cpu, cuda or cuda:N$' --device gpu --config "$tiny"
if out=$("$bench" --plan --config "$tiny" "$src/configs/loopmoe_tiny.toml" \
  "$src/configs/gpu_small_vanilla.toml" "$src/configs/gpu_small_loopmoe.toml" --batch 16 256 2>&1) &&
  [ "$(printf '%s\n' "$out" | grep -c '\.toml/')" -eq 8 ]; then
  echo "ok: loopmoe_bench --plan (8 cases)"
else
  echo "FAILED: loopmoe_bench --plan:"
  printf '%s\n' "$out"
  fail=1
fi
exit $fail
