#!/usr/bin/env bash
# CLI behaviour: help, and one clear "error: ..." line for bad input: exit 2 for a command line that
# cannot be used (CLI11 finds it), exit 1 for a command that fails. Usage: cli_test.sh LOOPMOE
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
expect no_subcommand 2 "^error: A subcommand is required$" -- "$bin"
expect typo 1 "^error: .*typo.toml: unknown key model.d_modle$" -- "$bin" train --config "$tmp/typo.toml" --out "$tmp/r1"
expect topk 1 "top_k = 4 exceeds model.n_experts = 2" -- "$bin" train --config "$tmp/topk.toml" --out "$tmp/r2"
expect missing_config 2 "^error: --config: File does not exist: .*none.toml$" -- "$bin" train --config "$tmp/none.toml"
expect train_bad_threads 2 "^error: Could not convert: --threads = many$" -- "$bin" train --config "$tmp/topk.toml" --threads many
expect missing_data 1 "nodata/train.bin" -- "$bin" train --config "$tmp/nodata.toml" --out "$tmp/r3"
expect prepare_missing_input 2 "^error: --input: Path does not exist: .*nothing_here$" -- "$bin" data prepare --input "$tmp/nothing_here" --vocab 300 --out "$tmp/d"
expect prepare_no_vocab 2 "^error: --vocab N is required unless --tokenizer MODEL is given$" -- "$bin" data prepare --input "$tmp/topk.toml" --out "$tmp/d"
expect info_no_shard 2 "^error: shards is required$" -- "$bin" data info
if [ -e "$tmp/d" ]; then echo "FAIL prepare usage errors created $tmp/d"; fails=$((fails + 1)); fi
# One big text file (nanoGPT's input.txt): cut into chunks, so validation is never empty; the same
# input gives byte-identical output; a file too small for any split is one clear error.
cat "$(dirname "$0")"/../docs/*.md > "$tmp/input.txt"
expect prepare_one_file 0 "val [1-9][0-9]* docs / [1-9][0-9]* tokens; 1 document cut into [0-9]+ chunks" -- "$bin" data prepare --input "$tmp/input.txt" --vocab 512 --out "$tmp/book"
"$bin" data prepare --input "$tmp/input.txt" --vocab 512 --out "$tmp/book2" > /dev/null 2>&1
for f in tokenizer.model train.bin val.bin meta.json; do
  expect "prepare_same_$f" 0 "" -- cmp "$tmp/book/$f" "$tmp/book2/$f"
done
printf 'A few lines of text.\nFar too few to hold any of them out.\n' > "$tmp/small.txt"
expect prepare_too_small 1 "^error: .*small.txt: too little text for a train/validation split" -- "$bin" data prepare --input "$tmp/small.txt" --vocab 512 --out "$tmp/small"
if [ -e "$tmp/small" ]; then echo "FAIL prepare_too_small left $tmp/small behind"; fails=$((fails + 1)); fi
printf '[model]\nvocab_size = 512\nseq_len = 64\nd_model = 32\nn_heads = 2\nhead_dim = 16\nn_layers = 1\nn_experts = 4\nexpert_hidden = 32\n[train]\nbatch_size = 2\nsteps = 4\nwarmup_steps = 1\neval_interval = 2\neval_batches = 1\nlog_interval = 2\n[data]\ndir = "%s"\n' "$tmp/book" > "$tmp/book.toml"
expect train_one_file 0 "^final validation loss [0-9.]+" -- "$bin" train --config "$tmp/book.toml" --out "$tmp/ok_book" --no-progress
# Resuming a finished run: it says so (with the last recorded validation loss) and writes nothing.
cp -p "$tmp/ok_book/metrics.jsonl" "$tmp/ok_book.metrics"
ls -l --time-style=full-iso "$tmp/ok_book" > "$tmp/ok_book.ls"
expect train_already_complete 0 "^run already complete at step 4; last validation loss [0-9]+\.[0-9]{4}$" -- "$bin" train --config "$tmp/book.toml" --out "$tmp/ok_book" --resume
if ! cmp -s "$tmp/ok_book/metrics.jsonl" "$tmp/ok_book.metrics" || ! ls -l --time-style=full-iso "$tmp/ok_book" | cmp -s - "$tmp/ok_book.ls"; then
  echo "FAIL train_already_complete changed the run directory"; fails=$((fails + 1))
fi
# A dataset from before: val.bin holds no tokens. train fails at once, naming it, not after 60 steps.
mkdir -p "$tmp/oldval"
cp "$tmp/book/train.bin" "$tmp/oldval/"
printf 'LMOETOK\0\1\0\0\0\0\2\0\0\2\0\0\0\0\0\0\0' > "$tmp/oldval/val.bin"  # header: v1, vocab 512
head -c 32 /dev/zero >> "$tmp/oldval/val.bin"
sed "s|$tmp/book|$tmp/oldval|" "$tmp/book.toml" > "$tmp/oldval.toml"
expect train_empty_val 1 "^error: .*oldval/val.bin: too few tokens for seq_len 64: shard holds 0, one window needs 65; the run validates every train.eval_interval = 2 steps" -- "$bin" train --config "$tmp/oldval.toml" --steps 60 --out "$tmp/r_oldval"
if [ -e "$tmp/r_oldval" ]; then echo "FAIL train_empty_val created its run directory"; fails=$((fails + 1)); fi
cfg_dir=$(dirname "$0")/../configs
expect budget_table 0 "flops_per_token_train" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 4
expect budget_json 0 '"relative_diff"' -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 4 --json
expect budget_bad_loops 1 "not a multiple of loops = 3" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 3
expect budget_bad_balance 1 "balance" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 4 --balance more
expect budget_zero_loops 2 "^error: --loops: 0 is not positive$" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 0
expect budget_cond_dim 0 "cond_dim fixed at 32" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 4 --cond-dim 32
expect budget_odd_cond_dim 1 "cond_dim must be even and at least 2, got 31" -- "$bin" budget --config "$cfg_dir/vanilla_tiny.toml" --loops 4 --cond-dim 31
mkdir -p "$tmp/empty_run"
expect eval_help 0 "--halt-thresholds" -- "$bin" eval --help
expect eval_no_checkpoint 1 "^error: .*empty_run/checkpoint.bin: cannot open checkpoint" -- "$bin" eval --checkpoint "$tmp/empty_run"
expect audit_no_checkpoint 1 "^error: .*empty_run/checkpoint.bin: cannot open checkpoint" -- "$bin" audit --checkpoint "$tmp/empty_run"
expect audit_missing 2 "^error: --checkpoint: Directory does not exist: .*nowhere$" -- "$bin" audit --checkpoint "$tmp/nowhere"
expect eval_bad_batches 2 "^error: --batches: 0 is not positive$" -- "$bin" eval --checkpoint "$tmp/empty_run" --batches 0
expect compare_missing 2 "^error: runs: Directory does not exist: .*nowhere$" -- "$bin" compare "$tmp/nowhere"
expect experiment_missing 2 "^error: --spec: File does not exist: .*nowhere.toml$" -- "$bin" experiment --spec "$tmp/nowhere.toml"
expect report_missing 2 "^error: --runs: Directory does not exist: .*nowhere$" -- "$bin" report --runs "$tmp/nowhere"
# Training-service commands: help, and one clear line within seconds when no coordinator answers.
nobody=127.0.0.1:1
unreachable="^error: cannot reach the coordinator at $nobody \\(.*\\): is 'loopmoe cluster up' running\\?$"
for cmd in submit status list cancel logs; do
  expect "${cmd}_help" 0 "--coordinator" -- "$bin" $cmd --help
done
expect cluster_up_help 0 "--metrics-base-port" -- "$bin" cluster up --help
# Credentials: a throwaway set (the TLS handshake never happens when nothing listens).
"$bin" cluster credentials --dir "$tmp/creds" > /dev/null || { echo "FAIL cluster credentials"; fails=$((fails + 1)); }
export LOOPMOE_CA="$tmp/creds/ca.pem" LOOPMOE_TOKEN_FILE="$tmp/creds/cli.token"
expect submit_unreachable 1 "$unreachable" -- "$bin" submit "$cfg_dir/loopmoe_tiny.toml" --coordinator $nobody
expect status_unreachable 1 "$unreachable" -- "$bin" status 1 --coordinator $nobody
expect list_unreachable 1 "$unreachable" -- env LOOPMOE_COORDINATOR=$nobody "$bin" list
expect cancel_unreachable 1 "$unreachable" -- "$bin" cancel 1 --coordinator $nobody
expect logs_unreachable 1 "$unreachable" -- "$bin" logs 1 --follow --coordinator $nobody
expect list_unreachable_insecure 1 "$unreachable" -- env -u LOOPMOE_CA -u LOOPMOE_TOKEN_FILE "$bin" list --insecure --coordinator $nobody
expect list_no_credentials 1 "^error: no credentials for the coordinator at $nobody: give --ca and --token-file" -- env -u LOOPMOE_CA -u LOOPMOE_TOKEN_FILE "$bin" list --coordinator $nobody
expect list_insecure_and_ca 1 "^error: --insecure cannot be combined" -- "$bin" list --insecure --coordinator $nobody
unset LOOPMOE_CA LOOPMOE_TOKEN_FILE
expect credentials_help 0 "--name" -- "$bin" cluster credentials --help
expect submit_missing 2 "^error: JOB.toml: File does not exist: .*nowhere.toml$" -- "$bin" submit "$tmp/nowhere.toml" --coordinator $nobody
expect status_no_job 2 "^error: JOB_ID is required$" -- "$bin" status --coordinator $nobody
expect cluster_up_bad_port 2 "^error: --port: Value 0 not in range 1 to 65535$" -- "$bin" cluster up --port 0 --dir "$tmp/no_cluster"
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
  expect cluster_up_credentials 0 "^credentials: CA $tmp/cluster/credentials/ca.pem" -- cat "$tmp/cluster.out"
  # The cluster is secured: no credentials, a wrong token, plaintext: all refused.
  expect list_without_credentials 1 "^error: no credentials for the coordinator" -- "$bin" list --coordinator $at
  expect list_wrong_token 1 "^error: the coordinator at $at refused the credentials: invalid bearer token" -- env LOOPMOE_TOKEN=0123456789abcdef0123 "$bin" list --coordinator $at --cluster-dir "$tmp/cluster"
  expect list_process_token 1 "refused the credentials: .*ListJobs needs the CLI \(control\) token" -- "$bin" list --coordinator $at --ca "$tmp/cluster/credentials/ca.pem" --token-file "$tmp/cluster/credentials/process.token"
  expect list_plaintext 1 "^error: cannot reach the coordinator" -- "$bin" list --coordinator $at --insecure
  expect list_wrong_ca 1 "^error: TLS handshake with the coordinator at $at failed" -- "$bin" list --coordinator $at --ca "$tmp/creds/ca.pem" --token-file "$tmp/cluster/credentials/cli.token"
  # The other commands take the credentials from the cluster directory.
  export LOOPMOE_CLUSTER_DIR="$tmp/cluster"
  # The coordinator checks the job's dataset at submission: one that would fail it is refused.
  sed "s|^dir = .*|dir = \"$tmp/book\"|" "$cfg_dir/loopmoe_tiny.toml" > "$tmp/job.toml"
  sed "s|^dir = .*|dir = \"$tmp/oldval\"|" "$cfg_dir/loopmoe_tiny.toml" > "$tmp/job_oldval.toml"
  expect submit_bad_data 1 "^error: job spec: data.dir: .*oldval/val.bin: too few tokens for seq_len 128: shard holds 0" -- "$bin" submit "$tmp/job_oldval.toml" --coordinator $at
  # Jobs write only under the data root (cluster up: the current directory).
  { cat "$tmp/job.toml"; printf '[job]\noutput_dir = "/"\n'; } > "$tmp/job_escape.toml"
  expect submit_output_escape 1 "^error: job spec: output_dir: / \(resolved /\) is outside the coordinator's data root" -- "$bin" submit "$tmp/job_escape.toml" --coordinator $at
  expect submit_ok 0 "^submitted job 1$" -- "$bin" submit "$tmp/job.toml" --coordinator $at --shards 2
  expect list_ok 0 "^1 +queued +0/" -- "$bin" list --coordinator $at
  expect status_ok 0 "^job 1: queued" -- "$bin" status 1 --coordinator $at
  expect logs_ok 0 "submitted: 1 worker\\(s\\), 2 shard\\(s\\)" -- "$bin" logs 1 --coordinator $at
  expect cancel_ok 0 "^job 1: cancelled" -- "$bin" cancel 1 --coordinator $at
  expect status_unknown 1 "^error: no job '7'$" -- "$bin" status 7 --coordinator $at
  kill -INT $cluster_pid
  wait $cluster_pid
  expect cluster_stopped 0 "cluster stopped" -- cat "$tmp/cluster.out"
  unset LOOPMOE_CLUSTER_DIR
else
  echo "skip cluster: $coord not built"
fi
# Bad input loses nothing: the failed runs left no checkpoint behind.
if ls "$tmp"/r*/checkpoint.bin >/dev/null 2>&1; then echo "FAIL: a failed run wrote a checkpoint"; fails=$((fails + 1)); fi
exit $fails
