#!/usr/bin/env bash
# The whole service with real processes on loopback: a coordinator, 3 workers and 3 expert
# shards started by hand; a 2-worker, 2-shard job; one of its workers killed (SIGKILL) after a
# committed checkpoint. The job must restart on the spare worker from that checkpoint and finish
# with the same loss curve, step for step, as `loopmoe train` in one process (the trainer prints 8
# significant digits). A second job continues the first's step-110 checkpoint on 1 worker and 3
# shards (experts re-mapped by global id) and must match the same curve; a third job loses a shard
# instead of a worker and must too. The processes' Prometheus metrics are scraped on the way.
# Then `loopmoe cluster up` runs a job to completion and stops on SIGINT.
# Usage: service_e2e.sh BUILD_DIR
set -uo pipefail
# ctest runs this once per OpenBLAS kernel choice; one this CPU cannot execute is skipped (77).
case "${OPENBLAS_CORETYPE:-}" in
  SkylakeX | Cooperlake | SapphireRapids) need=avx512f ;;
  Haswell | Zen) need=avx2 ;;
  *) need="" ;;
esac
if [ -n "$need" ] && ! grep -qw "$need" /proc/cpuinfo; then
  echo "SKIP: OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE needs $need, which this CPU does not have"
  exit 77
fi
build=$(cd "$1" && pwd)
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$tmp"/*.log; do echo "--- $f"; tail -15 "$f"; done
  exit 1
}
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Data: the repository's docs, one document per line.
# shellcheck source=tests/tiny_service_job.sh
source "$(dirname "$0")"/tiny_service_job.sh
tiny_service_data "$build/loopmoe" "$(dirname "$0")"/.. "$tmp" || fail "data prepare"
tiny_service_job "$tmp/job.toml" "$tmp/data" 120 40 10

"$build/loopmoe" train --config "$tmp/job.toml" --out "$tmp/single" --no-progress \
  > "$tmp/single.log" 2>&1 || fail "single-process train"

# logged_address LOG PATTERN: the HOST:PORT a process logged after PATTERN (every server here
# listens on port 0, so the kernel picks free ports and nothing races for them).
logged_address() {
  local a=""
  for _ in $(seq 200); do
    a=$(grep -oE "$2[0-9.]+:[0-9]+" "$1" 2>/dev/null | head -1 | grep -oE '[0-9.]+:[0-9]+$')
    [ -n "$a" ] && break
    sleep 0.05
  done
  [ -n "$a" ] || fail "no address after '$2' in $1"
  echo "$a"
}
# Secured by hand: throwaway credentials, the servers' settings from the environment (as in
# deploy/), the CLI token on the coordinator's command line.
"$build/loopmoe" cluster credentials --dir "$tmp/creds" > /dev/null || fail "cluster credentials"
export LOOPMOE_TLS_CA=$tmp/creds/ca.pem LOOPMOE_TLS_CERT=$tmp/creds/server.pem \
  LOOPMOE_TLS_KEY=$tmp/creds/server.key LOOPMOE_PROCESS_TOKEN_FILE=$tmp/creds/process.token \
  LOOPMOE_MTLS=1
"$build/loopmoe-coordinator" --listen 127.0.0.1:0 --data-dir "$tmp/coord" --heartbeat-timeout-ms 3000 \
  --metrics-listen 127.0.0.1:0 --cli-token-file "$tmp/creds/cli.token" \
  > "$tmp/coordinator.log" 2>&1 &
pids+=($!)
addr=$(logged_address "$tmp/coordinator.log" "listening on ")
coord_metrics=$(logged_address "$tmp/coordinator.log" "metrics on http://" | cut -d: -f2)
for i in 0 1 2; do
  "$build/loopmoe-worker" --coordinator "$addr" --metrics-listen 127.0.0.1:0 \
    > "$tmp/worker$i.log" 2>&1 &
  pids+=($!)
  worker_pid[$i]=$!
done
for i in 0 1 2; do
  worker_metrics[$i]=$(logged_address "$tmp/worker$i.log" "metrics on http://" | cut -d: -f2)
done
for i in 0 1 2; do
  "$build/loopmoe-expert-shard" --coordinator "$addr" > "$tmp/shard$i.log" 2>&1 &
  pids+=($!)
  shard_pid[$i]=$!
done
export LOOPMOE_COORDINATOR=$addr LOOPMOE_CA=$tmp/creds/ca.pem LOOPMOE_TOKEN_FILE=$tmp/creds/cli.token
job=""
for _ in $(seq 100); do
  job=$("$build/loopmoe" submit "$tmp/job.toml" --workers 2 --shards 2 --name e2e 2>/dev/null \
    | grep -oE '[0-9]+' | head -1) && [ -n "$job" ] && break
  sleep 0.1
done
[ -n "$job" ] || fail "submit"
echo "submitted job $job"

# kill_after_checkpoint JOB ROLE: SIGKILL one of JOB's processes of ROLE (worker | shard) once a
# checkpoint has been committed (and well before the end); sets killed (index) and ckpt.
kill_after_checkpoint() {
  local job=$1 role=$2 status step i
  killed=""
  for _ in $(seq 600); do
    status=$("$build/loopmoe" status "$job" 2>&1)
    ckpt=$(grep -oiE 'checkpoint[^0-9]*[0-9]+' <<<"$status" | grep -oE '[0-9]+$' | head -1)
    step=$(grep -oiE '^ *step[^0-9]*[0-9]+' <<<"$status" | grep -oE '[0-9]+$' | head -1)
    if [ -n "$ckpt" ] && [ "$ckpt" -ge 10 ]; then
      [ -n "$step" ] && [ "$step" -ge 100 ] && fail "job $job ran too fast to kill a $role mid-run"
      for i in 0 1 2; do
        if grep -q "of job $job: joined" "$tmp/$role$i.log"; then
          local -n pid_of="${role}_pid"
          kill -9 "${pid_of[$i]}"
          wait "${pid_of[$i]}" 2>/dev/null
          killed=$i
          break
        fi
      done
      break
    fi
    sleep 0.05
  done
  [ -n "$killed" ] || fail "never saw a committed checkpoint of job $job to kill a $role after"
  echo "killed $role $killed of job $job after checkpoint step $ckpt (step ${step:-?})"
}

# wait_done JOB: waits for a terminal state, writes the log to $tmp/job-JOB.log, sets state.
wait_done() {
  state=""
  for _ in $(seq 1200); do
    state=$("$build/loopmoe" status "$1" 2>&1 | grep -oE ': (succeeded|failed|cancelled)$' | head -1 | tr -d ': ')
    [ -n "$state" ] && break
    sleep 0.1
  done
  "$build/loopmoe" logs "$1" > "$tmp/job-$1.log" 2>&1
}

# curve_equal RUN_METRICS FIRST_STEP: the run's losses from FIRST_STEP to 120 (and validation
# losses) equal the single process's to the trainer's printed precision.
curve_equal() {
  /usr/bin/python3 - "$tmp/single/metrics.jsonl" "$1" "$2" <<'PY'
import json, sys
def read(path):
    steps, vals = {}, {}
    for line in open(path):
        r = json.loads(line)
        (vals if "val_loss" in r else steps)[r["step"]] = r.get("val_loss", r.get("loss"))
    return steps, vals
(s1, v1), (s2, v2) = read(sys.argv[1]), read(sys.argv[2])
first = int(sys.argv[3])
assert sorted(s2) == list(range(first, 121)), (min(s2), max(s2), len(s2))
worst = max(abs(s1[k] - s2[k]) / abs(s1[k]) for k in s2)
assert worst <= 1e-7, f"worst relative difference {worst:.3g}"
assert all(abs(v1[k] - v2[k]) <= 1e-7 * abs(v1[k]) for k in v2), (v1, v2)
print(f"steps {first}-120 equal the single process (worst {worst:.2g})")
PY
}

kill_after_checkpoint "$job" worker

wait_done "$job"
cp "$tmp/job-$job.log" "$tmp/job.log"
[ "$state" = succeeded ] || fail "job ended $state"
grep -q "epoch 1" "$tmp/job.log" || fail "no restart (epoch 1) in the job log"
grep -qE "resuming from step [0-9]+" "$tmp/job.log" || fail "the restart did not resume from a checkpoint"
run_dir="$tmp/coord/jobs/$job"
[ -f "$run_dir/metrics.jsonl" ] || fail "no $run_dir/metrics.jsonl"
result=$(curve_equal "$run_dir/metrics.jsonl" 1) || fail "loss curves differ: $result"
echo "ok   worker killed and replaced: $result"

# Prometheus metrics of the real processes after the job: worker 0 of job 1's restarted run (it
# ran the steps after the restart; worker 0 is the one that reports tokens per expert) and the
# coordinator.
survivor=""
for i in 0 1 2; do
  grep -q "worker 0 of job $job: joined (epoch 1" "$tmp/worker$i.log" && survivor=$i && break
done
[ -n "$survivor" ] || fail "no worker of the restarted run"
resumed_at=$(grep -oE "resuming from step [0-9]+" "$tmp/job.log" | head -1 | grep -oE '[0-9]+$')
/usr/bin/python3 - "${worker_metrics[$survivor]}" "$coord_metrics" "$((120 - resumed_at))" <<'PY' || fail "metrics"
import re, sys, urllib.request
def scrape(port):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
def values(text, name):
    return [float(m.group(2)) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)]
w = scrape(sys.argv[1])
steps = values(w, "loopmoe_steps_total")
assert steps and max(steps) == int(sys.argv[3]), f"loopmoe_steps_total {steps}, want {sys.argv[3]}"
expert = [l for l in w.splitlines() if l.startswith("loopmoe_expert_tokens_total{")]
labels = {tuple(re.search(rf'{k}="(\d+)"', l).group(1) for k in ("layer", "iteration", "expert")) for l in expert}
assert len(labels) == 2 * 2 * 6, f"{len(labels)} (layer, iteration, expert) series"  # N=2, R=2, E=6
for name in ("loopmoe_train_loss", "loopmoe_alltoall_bytes_total", "loopmoe_step_duration_seconds_count",
             "loopmoe_dropped_tokens_total", "loopmoe_expert_overload_factor", "loopmoe_heartbeat_age_seconds"):
    assert values(w, name), f"worker metrics lack {name}"
assert max(values(w, "loopmoe_alltoall_bytes_total")) > 0
c = scrape(sys.argv[2])
for name in ("loopmoe_coordinator_jobs", "loopmoe_process_heartbeat_age_seconds"):
    assert values(c, name), f"coordinator metrics lack {name}"
print(f"ok   metrics: worker steps {max(steps):.0f}, {len(labels)} expert-token series; coordinator jobs and heartbeat ages")
PY

# Job 1's checkpoint at step 110 onto 1 worker and 3 shards.
"$build/loopmoe" submit "$tmp/job.toml" --workers 1 --shards 3 --resume-from "$job:110" --follow \
  > "$tmp/job2.log" 2>&1
job2=$(grep -oE 'submitted job [0-9]+' "$tmp/job2.log" | grep -oE '[0-9]+$')
grep -q "resuming from step 110 of job $job" "$tmp/job2.log" || fail "job 2 did not resume from job $job: $(cat "$tmp/job2.log")"
grep -q "succeeded after 120 steps" "$tmp/job2.log" || fail "job 2 did not succeed"
result=$(curve_equal "$tmp/coord/jobs/$job2/metrics.jsonl" 111) || fail "resumed curve differs: $result"
echo "ok   2 shards -> 3 shards (and 2 workers -> 1): $result"
"$build/loopmoe" submit "$tmp/job.toml" --resume-from "$job:7" > "$tmp/bad.log" 2>&1 &&
  fail "a resume from an uncommitted step was accepted"
grep -q "no committed checkpoint at step 7" "$tmp/bad.log" || fail "unclear error: $(cat "$tmp/bad.log")"

# A shard of a fresh 2 + 2 job killed: the job restarts on the spare shard (ranks and expert
# ranges re-assigned, experts found by global id) and finishes on the same curve.
job3=$("$build/loopmoe" submit "$tmp/job.toml" --workers 2 --shards 2 | grep -oE '[0-9]+$')
kill_after_checkpoint "$job3" shard
wait_done "$job3"
[ "$state" = succeeded ] || fail "job $job3 ended $state"
grep -q "epoch 1" "$tmp/job-$job3.log" || fail "job $job3 did not restart"
result=$(curve_equal "$tmp/coord/jobs/$job3/metrics.jsonl" 1) || fail "job $job3 curve differs: $result"
echo "ok   shard killed and replaced: $result"

# loopmoe cluster up: real workers and shards, a job to completion, clean stop on SIGINT.
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
port=$(free_port)  # the only pre-picked port: nothing else is starting now
export LOOPMOE_COORDINATOR=127.0.0.1:$port
sed -i 's/^steps = 120/steps = 12/' "$tmp/job.toml"
"$build/loopmoe" cluster up --workers 2 --shards 2 --port "$port" --dir "$tmp/cluster" \
  > "$tmp/cluster.log" 2>&1 &
cluster=$!
pids+=($cluster)
# cluster up makes its own credentials (its children ignore the LOOPMOE_TLS_* of this shell);
# the CLI takes them from DIR/cluster.env, written once everything is up.
for _ in $(seq 600); do [ -f "$tmp/cluster/cluster.env" ] && break; sleep 0.1; done
[ -f "$tmp/cluster/cluster.env" ] || fail "cluster up wrote no cluster.env: $(tail -3 "$tmp/cluster.log")"
unset LOOPMOE_CA LOOPMOE_TOKEN_FILE
# shellcheck disable=SC1091
source "$tmp/cluster/cluster.env"
ok=""
for _ in $(seq 200); do
  if "$build/loopmoe" submit "$tmp/job.toml" --workers 2 --shards 2 --follow > "$tmp/follow.log" 2>&1; then
    ok=1
    break
  fi
  grep -q "cannot reach" "$tmp/follow.log" || break
  sleep 0.1
done
[ -n "$ok" ] || fail "cluster up job: $(tail -3 "$tmp/follow.log")"
grep -q "succeeded after 12 steps" "$tmp/follow.log" || fail "no success line in the followed log"
kill -INT "$cluster"
wait "$cluster"
code=$?
[ "$code" = 0 ] || fail "cluster up exited $code on SIGINT"
echo "ok   cluster up: 2 workers + 2 shards ran a job; SIGINT stopped everything (exit 0)"
