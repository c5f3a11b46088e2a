#!/usr/bin/env bash
# CLI behaviour: help, and one clear error line (exit 1) for bad input. Usage: cli_test.sh LOOPMOE
set -uo pipefail
bin=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
expect() {  # expect NAME WANT_EXIT PATTERN -- command...
  local name=$1 want=$2 pattern=$3
  shift 4
  out=$("$@" 2>&1)
  code=$?
  if [ "$code" != "$want" ] || ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL $name: exit $code (want $want), output:"
    echo "$out" | head -20
    fails=$((fails + 1))
  else
    echo "ok   $name"
  fi
}
printf '[model]\nd_modle = 64\n' > "$tmp/typo.toml"
printf '[model]\nn_experts = 2\ntop_k = 4\n' > "$tmp/topk.toml"
printf '[data]\ndir = "%s/nodata"\n' "$tmp" > "$tmp/nodata.toml"
expect help 0 "train" -- "$bin" --help
expect train_help 0 "--resume" -- "$bin" train --help
expect no_subcommand 106 "subcommand" -- "$bin"
expect typo 1 "^error: .*typo.toml: unknown key model.d_modle$" -- "$bin" train --config "$tmp/typo.toml" --out "$tmp/r1"
expect topk 1 "top_k = 4 exceeds model.n_experts = 2" -- "$bin" train --config "$tmp/topk.toml" --out "$tmp/r2"
expect missing_config 105 "File does not exist" -- "$bin" train --config "$tmp/none.toml"
expect missing_data 1 "nodata/train.bin" -- "$bin" train --config "$tmp/nodata.toml" --out "$tmp/r3"
expect prepare_missing_input 105 "nothing_here" -- "$bin" data prepare --input "$tmp/nothing_here" --vocab 300 --out "$tmp/d"
cfg_dir=$(dirname "$0")/../configs
expect budget_table 0 "flops_per_token_train" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 4
expect budget_json 0 '"relative_diff"' -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 4 --json
expect budget_bad_loops 1 "not a multiple of loops = 3" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 3
expect budget_bad_balance 1 "balance" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 4 --balance more
mkdir -p "$tmp/empty_run"
expect eval_help 0 "--halt-thresholds" -- "$bin" eval --help
expect eval_no_checkpoint 1 "^error: .*empty_run/checkpoint.bin: cannot open checkpoint" -- "$bin" eval --checkpoint "$tmp/empty_run"
expect audit_no_checkpoint 1 "^error: .*empty_run/checkpoint.bin: cannot open checkpoint" -- "$bin" audit --checkpoint "$tmp/empty_run"
expect audit_missing 105 "nowhere" -- "$bin" audit --checkpoint "$tmp/nowhere"
# Training-service commands: help, and one clear line within seconds when no coordinator answers.
nobody=127.0.0.1:1
unreachable="^error: cannot reach the coordinator at $nobody \\(.*\\): is 'loopmoe cluster up' running\\?$"
for cmd in submit status list cancel logs; do
  expect "${cmd}_help" 0 "--coordinator" -- "$bin" $cmd --help
done
expect cluster_up_help 0 "--metrics-base-port" -- "$bin" cluster up --help
expect submit_unreachable 1 "$unreachable" -- "$bin" submit "$cfg_dir/loopmoe_tiny.toml" --coordinator $nobody
expect status_unreachable 1 "$unreachable" -- "$bin" status 1 --coordinator $nobody
expect list_unreachable 1 "$unreachable" -- env LOOPMOE_COORDINATOR=$nobody "$bin" list
expect cancel_unreachable 1 "$unreachable" -- "$bin" cancel 1 --coordinator $nobody
expect logs_unreachable 1 "$unreachable" -- "$bin" logs 1 --follow --coordinator $nobody
printf '[model]\nn_experts = 2\n[job]\nshards = 3\n' > "$tmp/shards.toml"
expect submit_bad_shards 1 "^error: .*shards.toml: shards = 3 must be in \\[1, 2\\] \\(model.n_experts\\)$" -- "$bin" submit "$tmp/shards.toml" --coordinator $nobody
printf '[job]\nworkerz = 2\n' > "$tmp/jobtypo.toml"
expect submit_job_typo 1 "^error: .*jobtypo.toml: unknown key job.workerz$" -- "$bin" submit "$tmp/jobtypo.toml" --coordinator $nobody
# A coordinator alone (no workers): submit, list, status, logs, cancel, unknown job, Ctrl-C.
coord=$(dirname "$bin")/loopmoe-coordinator
if [ -x "$coord" ]; then
  port=$((20000 + RANDOM % 20000))
  "$bin" cluster up --workers 0 --shards 0 --port $port --dir "$tmp/cluster" > "$tmp/cluster.out" 2>&1 &
  cluster_pid=$!
  for _ in $(seq 100); do grep -q "cluster up" "$tmp/cluster.out" && break; sleep 0.1; done
  at=127.0.0.1:$port
  expect cluster_up_ready 0 "coordinator +127.0.0.1:$port" -- cat "$tmp/cluster.out"
  expect submit_ok 0 "^submitted job 1$" -- "$bin" submit "$cfg_dir/loopmoe_tiny.toml" --coordinator $at --shards 2
  expect list_ok 0 "^1 +queued +0/" -- "$bin" list --coordinator $at
  expect status_ok 0 "^job 1: queued" -- "$bin" status 1 --coordinator $at
  expect logs_ok 0 "submitted: 1 worker\\(s\\), 2 shard\\(s\\)" -- "$bin" logs 1 --coordinator $at
  expect cancel_ok 0 "^job 1: cancelled" -- "$bin" cancel 1 --coordinator $at
  expect status_unknown 1 "^error: no job '7'$" -- "$bin" status 7 --coordinator $at
  kill -INT $cluster_pid
  wait $cluster_pid
  expect cluster_stopped 0 "cluster stopped" -- cat "$tmp/cluster.out"
else
  echo "skip cluster: $coord not built"
fi
# Bad input loses nothing: the failed runs left no checkpoint behind.
if ls "$tmp"/r*/checkpoint.bin >/dev/null 2>&1; then echo "FAIL: a failed run wrote a checkpoint"; fails=$((fails + 1)); fi
exit $fails
