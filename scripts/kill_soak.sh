#!/usr/bin/env bash
# Kill soak (issue 11 item 4): one training job on a local cluster (a coordinator, W workers and
# S expert shards started here as separate processes, secured with throwaway TLS credentials and
# tokens as in tests/service_e2e.sh) survives SIGKILL of a random process at N random moments:
# the coordinator (restarted on the same --data-dir and port), a worker or a shard (restarted;
# it registers anew). The victims cycle through the three roles in a random order per round of
# three, so any N >= 3 kills each role at least once. Kills 3, 6, 9, ... strike within a second
# of the previous victim's restart: while the job waits in the queue for its processes, is
# configured and its processes rendezvous, or runs its first steps. The others wait until it
# runs again and has reached a random target step, then a random delay (0-500 ms), so they land
# in steps, evaluations and checkpoint rounds.
# The processes run with --collective-timeout 20 (docs/SERVICE.md "Kill tests" says why).
# The job must end SUCCEEDED with final checkpoint files whose parameters, AdamW moments, step
# and data position are bit-identical to those of the same job run without kills first on the
# same cluster, and the same loss curve (every logged value at full precision). Prints a table of
# the kills; exits 1 on any mismatch or failure, 2 when the run cannot place the kills (the job
# ended first: use more --steps). Every process it started is killed on any exit.
#
# Usage: scripts/kill_soak.sh [--kills N] [--seed S] [--steps K] [--workers W] [--shards S]
#                             [--checkpoint-interval C] [--build DIR] [--keep]
#   --kills N   kills during the job (default 6)         --seed S   schedule seed (default 1)
#   --steps K   train.steps of the job (default 150)     --checkpoint-interval C (default 10)
#   --workers W, --shards S  the job's processes (default 2 and 2; no spares)
#   --build DIR  the build directory with loopmoe and the service executables (default build/)
#   --keep       keep the working directory (logs, both jobs' outputs) and print its path
# The seed fixes the kill schedule (targets, delays, victims); the moments themselves depend on
# the machine's speed. The summary ends with "kill soak: PASS" or "kill soak: FAIL".
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kills=6 seed=1 steps=150 workers=2 shards=2 ckpt_interval=10 build="$repo/build" keep=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) kills=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --checkpoint-interval) ckpt_interval=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "kill_soak.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in kills seed steps workers shards ckpt_interval; do
  flag=${v/ckpt_interval/checkpoint-interval}
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "kill_soak.sh: --$flag must be a number" >&2; exit 2; }
done
[ "$kills" -ge 1 ] && [ "$workers" -ge 1 ] && [ "$shards" -ge 1 ] && [ "$shards" -le 6 ] ||
  { echo "kill_soak.sh: need --kills >= 1, --workers >= 1, 1 <= --shards <= 6" >&2; exit 2; }
[ "$steps" -ge $((2 * kills + 10)) ] ||
  { echo "kill_soak.sh: --steps must be at least 2 * kills + 10" >&2; exit 2; }
build=$(cd "$build" 2>/dev/null && pwd) || { echo "kill_soak.sh: no build directory" >&2; exit 2; }
for exe in loopmoe loopmoe-service loopmoe-coordinator loopmoe-worker loopmoe-expert-shard; do
  [ -x "$build/$exe" ] || { echo "kill_soak.sh: $build/$exe is not built" >&2; exit 2; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kill_soak.XXXXXX")
pids=()  # every process started here, dead or alive
cleanup() {
  local p
  exec 2>/dev/null  # no "Killed" notices from the shell for the processes stopped here
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ -n "$keep" ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start_s=$(date +%s.%N)
elapsed() { awk -v a="$start_s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "[$(elapsed)s] $*"; }
fail() {
  echo "FAIL: $*"
  local f
  for f in "$tmp"/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -12 "$f"; }; done
  echo "kill soak: FAIL"
  exit 1
}

# --- Data and the job (the tiny model of tests/service_e2e.sh; 6 experts) -----------------------
# shellcheck source=tests/tiny_service_job.sh
source "$repo"/tests/tiny_service_job.sh
tiny_service_data "$build/loopmoe" "$repo" "$tmp" || fail "data prepare"
tiny_service_job "$tmp/job.toml" "$tmp/data" "$steps" 25 "$ckpt_interval"

# --- The cluster ---------------------------------------------------------------------------------
"$build/loopmoe" cluster credentials --dir "$tmp/creds" > /dev/null || fail "cluster credentials"
export LOOPMOE_TLS_CA=$tmp/creds/ca.pem LOOPMOE_TLS_CERT=$tmp/creds/server.pem \
  LOOPMOE_TLS_KEY=$tmp/creds/server.key LOOPMOE_PROCESS_TOKEN_FILE=$tmp/creds/process.token \
  LOOPMOE_MTLS=1
# Every kill costs the job at least one epoch (a restart), so the restart budget is not the limit.
coordinator_args=(--data-dir "$tmp/coord" --heartbeat-timeout-ms 2000 --max-restarts 100000
  --cli-token-file "$tmp/creds/cli.token")
coordinator_pid=""
start_coordinator() {  # start_coordinator LISTEN
  "$build/loopmoe-coordinator" --listen "$1" "${coordinator_args[@]}" \
    >> "$tmp/coordinator.log" 2>&1 &
  coordinator_pid=$!
  pids+=("$coordinator_pid")
}
# The address the coordinator logged after its start number $1 (1-based).
coordinator_address() {
  local a=""
  for _ in $(seq 600); do
    a=$(grep -oE 'coordinator listening on [0-9.]+:[0-9]+' "$tmp/coordinator.log" 2>/dev/null |
      sed -n "${1}p" | grep -oE '[0-9.]+:[0-9]+$')
    [ -n "$a" ] && break
    kill -0 "$coordinator_pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "$a"
}
coordinator_starts=1
start_coordinator 127.0.0.1:0  # the kernel picks a free port; restarts reuse it
addr=$(coordinator_address 1)
[ -n "$addr" ] || fail "the coordinator did not start"
declare -a worker_pid shard_pid
# --collective-timeout 20 (default 60): a coordinator killed while it sends a chunk's RunSteps may
# reach only some processes, which then wait in their collective for the others that long before
# they can join the restarted run (docs/SERVICE.md "Kill tests").
start_process() {  # start_process worker|shard INDEX
  local exe=loopmoe-worker
  [ "$1" = shard ] && exe=loopmoe-expert-shard
  "$build/$exe" --coordinator "$addr" --name "$1-$2" --collective-timeout 20 \
    >> "$tmp/$1$2.log" 2>&1 &
  pids+=($!)
  if [ "$1" = worker ]; then worker_pid[$2]=$!; else shard_pid[$2]=$!; fi
}
for ((i = 0; i < workers; ++i)); do start_process worker "$i"; done
for ((i = 0; i < shards; ++i)); do start_process shard "$i"; done
export LOOPMOE_COORDINATOR=$addr LOOPMOE_CA=$tmp/creds/ca.pem \
  LOOPMOE_TOKEN_FILE=$tmp/creds/cli.token

# job_status JOB: sets state, step, ckpt, epoch (empty when the coordinator does not answer).
job_status() {
  local s
  state="" step="" ckpt="" epoch=""
  s=$("$build/loopmoe" status "$1" 2>/dev/null) || return 1
  state=$(sed -n '1s/.*: //p' <<<"$s")
  step=$(sed -nE 's#^ *step +([0-9]+)/.*#\1#p' <<<"$s")
  ckpt=$(sed -nE 's#^ *checkpoint +step ([0-9]+)#\1#p' <<<"$s")
  epoch=$(sed -nE 's#^ *epoch +([0-9]+).*#\1#p' <<<"$s")
  ckpt=${ckpt:-0}
}
is_terminal() { [[ $1 =~ ^(succeeded|failed|cancelled)$ ]]; }
# wait_for JOB SECONDS CONDITION: polls job_status until CONDITION (evaluated) holds or the job
# ends; returns 1 on timeout.
wait_for() {
  local deadline=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if job_status "$1"; then
      eval "$3" && return 0
      is_terminal "$state" && return 0
    fi
    sleep 0.05
  done
  return 1
}
submit() {  # submit NAME: prints the job id
  local out
  for _ in $(seq 100); do
    out=$("$build/loopmoe" submit "$tmp/job.toml" --workers "$workers" --shards "$shards" \
      --name "$1" 2>&1) && { grep -oE '[0-9]+$' <<<"$out"; return 0; }
    sleep 0.2
  done
  echo "$out" >&2
  return 1
}

# --- 1. The same job without kills ---------------------------------------------------------------
ref=$(submit uninterrupted) || fail "submit"
say "job $ref (no kills) submitted: $steps steps, $workers worker(s) + $shards shard(s)"
wait_for "$ref" 900 false || fail "job $ref did not finish in 900 s"
[ "$state" = succeeded ] || fail "job $ref ended $state"
[ "$epoch" = 0 ] || fail "job $ref restarted (epoch $epoch) without any kill"
ref_s=$(elapsed)
say "job $ref succeeded"

# --- 2. The soak job -----------------------------------------------------------------------------
# The schedule, drawn up front from the seed: target steps (sorted), delays after reaching them
# (0-500 ms), pauses before restarting the victim (0-1000 ms), victims; kills 3, 6, ... use
# 6/5 of the delay and 1/5 of the pause as their two waits after the previous restart.
RANDOM=$seed  # drawn in this shell: a subshell would draw from a fresh seed
targets=()
for ((k = 0; k < kills; ++k)); do targets+=($((1 + RANDOM % (steps * 7 / 10)))); done
mapfile -t targets < <(printf '%s\n' "${targets[@]}" | sort -n)
declare -a delay_ms pause_ms victim_role victim_index
roles=(coordinator worker shard)
for ((k = 0; k < kills; ++k)); do
  if ((k % 3 == 0)); then  # a new round: the three roles in a random order
    order=(0 1 2)
    for ((i = 2; i > 0; --i)); do
      j=$((RANDOM % (i + 1)))
      t=${order[$i]} && order[$i]=${order[$j]} && order[$j]=$t
    done
  fi
  victim_role[$k]=${roles[${order[$((k % 3))]}]}
  case "${victim_role[$k]}" in
    worker) victim_index[$k]=$((RANDOM % workers)) ;;
    shard) victim_index[$k]=$((RANDOM % shards)) ;;
    *) victim_index[$k]=0 ;;
  esac
  delay_ms[$k]=$((RANDOM % 501))
  pause_ms[$k]=$((RANDOM % 1001))
done
sleep_ms() { sleep "$(awk -v ms="$1" 'BEGIN { printf "%.3f", ms / 1000 }')"; }

job=$(submit soak) || fail "submit"
job_start=$(date +%s.%N)
job_elapsed() { awk -v a="$job_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
shown=()
for ((k = 0; k < kills; ++k)); do ((k % 3 == 2)) && shown+=(quick) || shown+=("${targets[$k]}"); done
say "job $job (soak) submitted; $kills kills at steps >= ${shown[*]} (seed $seed)"
declare -a row pending name at_s at_state at_step at_ckpt before
declare -A killed_by_role=([coordinator]=0 [worker]=0 [shard]=0)
ended_early() {  # ended_early WHAT: the job ended before the kills were all placed
  [ "$state" = succeeded ] || fail "job $job ended $state"
  echo "$1: use more --steps"
  echo "kill soak: FAIL"
  exit 2
}
# running_again: waits until the job runs again having taken the last kill in (a kill while it
# is starting or running fails that run: a new epoch; one while it waits in the queue need not)
# and completes the table rows of the kills since the job last ran.
running_again() {
  local K=$((k - 1)) need
  need=${before[$K]}
  [[ ${at_state[$K]} =~ ^(starting|running)$ ]] && need=$((need + 1))
  wait_for "$job" 600 "[ \"\$state\" = running ] && [ \"\$epoch\" -ge $need ]" ||
    fail "job $job did not run again within 600 s of kill $k (${name[$K]})"
  if is_terminal "$state"; then
    [ "$epoch" -ge "$need" ] || ended_early "kill $k came after the job's end"
    [ "$k" -ge "$kills" ] || ended_early "the job ended before kill $((k + 1))"
  fi
  for K in "${pending[@]}"; do
    row[$K]=$(printf '%4d %7s  %-12s %-8s %5s %5s %5s %6s %7s' $((K + 1)) "${at_s[$K]}" \
      "${name[$K]}" "${at_state[$K]}" "${at_step[$K]}" "${at_ckpt[$K]}" "${before[$K]}" \
      "$epoch" "$(job_elapsed)")
    say "kill $((K + 1))/$kills: ${name[$K]} (job ${at_state[$K]}, step ${at_step[$K]}," \
      "checkpoint ${at_ckpt[$K]}); running again as epoch $epoch"
  done
  pending=()
}
for ((k = 0; k < kills; ++k)); do
  # Every third kill strikes soon after the previous victim was restarted, whatever the job is
  # doing then: waiting in the queue for its processes, being configured (the rendezvous), or
  # running its first steps (its state is read 0-600 ms after that restart, the kill follows
  # 0-200 ms later). The others wait until it runs again and has reached their target step, then
  # a random delay (0-500 ms): in a step, an evaluation or a checkpoint round.
  if ((k % 3 == 2)); then
    sleep_ms $((delay_ms[k] * 6 / 5))
    job_status "$job" || fail "status of job $job"
    sleep_ms $((pause_ms[k] / 5))
  else
    ((k > 0)) && running_again
    wait_for "$job" 600 "[ \"\$state\" = running ] && [ \"\$step\" -ge ${targets[$k]} ]" ||
      fail "job $job did not reach step ${targets[$k]} within 600 s"
    is_terminal "$state" && ended_early "the job ended before kill $((k + 1))"
    sleep_ms "${delay_ms[$k]}"
    job_status "$job" || fail "status of job $job"
  fi
  is_terminal "$state" && ended_early "the job ended before kill $((k + 1))"
  role=${victim_role[$k]} idx=${victim_index[$k]}
  case $role in
    coordinator) pid=$coordinator_pid name[$k]=coordinator ;;
    worker) pid=${worker_pid[$idx]} name[$k]="worker $idx" ;;
    shard) pid=${shard_pid[$idx]} name[$k]="shard $idx" ;;
  esac
  at_s[$k]=$(job_elapsed) at_state[$k]=$state at_step[$k]=$step at_ckpt[$k]=$ckpt before[$k]=$epoch
  kill -9 "$pid" 2>/dev/null || fail "${name[$k]} (pid $pid) was not running at kill $((k + 1))"
  wait "$pid" 2>/dev/null
  killed_by_role[$role]=$((killed_by_role[$role] + 1))
  pending+=("$k")
  sleep_ms "${pause_ms[$k]}"
  case $role in
    coordinator)
      # Same data dir and port: the processes only know this address.
      coordinator_starts=$((coordinator_starts + 1))
      start_coordinator "$addr"
      [ -n "$(coordinator_address "$coordinator_starts")" ] ||
        fail "the coordinator did not restart on $addr"
      ;;
    *) start_process "$role" "$idx" ;;
  esac
done
running_again
wait_for "$job" 900 false || fail "job $job did not finish in 900 s after the last kill"
[ "$state" = succeeded ] || fail "job $job ended $state"
"$build/loopmoe" logs "$job" > "$tmp/job-$job.log" 2>&1
soak_s=$(job_elapsed)

# --- 3. The comparison ---------------------------------------------------------------------------
final=$(printf 'step-%08d' "$steps")
result=$(/usr/bin/python3 - "$tmp/coord/jobs/$ref" "$tmp/coord/jobs/$job" "$final" "$steps" <<'PY'
import json, os, struct, sys
ref_dir, soak_dir, final, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
problems = []

def read(path):
    """Header fields and the three float32 arrays (bytes) of a worker-N.bin or shard-N.bin
    (docs/DATA.md "Checkpoint files", version 2)."""
    data = open(path, "rb").read()
    magic, version = data[:8], struct.unpack_from("<I", data, 8)[0]
    assert version == 2, f"{path}: version {version}"
    if magic == b"LMOEWRKR":
        rank, step, adam, seed, epoch, index, chash, n = struct.unpack_from("<IqqQQQQQ", data, 12)
        header = dict(rank=rank, step=step, adam_steps=adam, sampler=(seed, epoch, index),
                      config_hash=chash)
        off = 88
    elif magic == b"LMOESHRD":
        rank, step, adam, chash, layers, first, count, _, fpe = struct.unpack_from(
            "<IqqQIIIIQ", data, 12)
        header = dict(rank=rank, step=step, adam_steps=adam, config_hash=chash,
                      experts=(layers, first, count, fpe))
        n = layers * count * fpe
        off = 80
    else:
        raise SystemExit(f"{path}: unknown magic {magic!r}")
    assert len(data) == off + 12 * n, f"{path}: {len(data)} bytes for {n} floats per array"
    arrays = {name: data[off + i * 4 * n: off + (i + 1) * 4 * n]
              for i, name in enumerate(("params", "m", "v"))}
    return header, arrays, n

files = sorted(os.listdir(os.path.join(ref_dir, "checkpoints", final)))
files = [f for f in files if f.endswith(".bin")]
soak_files = sorted(f for f in os.listdir(os.path.join(soak_dir, "checkpoints", final))
                    if f.endswith(".bin"))
if files != soak_files:
    problems.append(f"final checkpoint files differ: {files} vs {soak_files}")
floats = 0
for f in files:
    if f not in soak_files:
        continue
    h1, a1, n = read(os.path.join(ref_dir, "checkpoints", final, f))
    h2, a2, _ = read(os.path.join(soak_dir, "checkpoints", final, f))
    floats += n
    if h1 != h2:
        problems.append(f"{f}: header {h2} differs from the uninterrupted run's {h1}")
    for name in ("params", "m", "v"):
        if a1[name] != a2[name]:
            diff = sum(1 for i in range(0, len(a1[name]), 4) if a1[name][i:i+4] != a2[name][i:i+4])
            problems.append(f"{f}: {diff} of {n} {name} values differ")
    if h1["step"] != steps:
        problems.append(f"{f}: step {h1['step']}, expected {steps}")

def curve(path):
    steps_, vals = {}, {}
    for line in open(path):
        r = json.loads(line)
        if "val_loss" in r:
            vals[r["step"]] = r["val_loss"]
        else:
            r.pop("tokens_per_s")
            if r["step"] in steps_:
                problems.append(f"{path}: step {r['step']} recorded twice")
            steps_[r["step"]] = r
    return steps_, vals
(s1, v1), (s2, v2) = curve(os.path.join(ref_dir, "metrics.jsonl")), curve(
    os.path.join(soak_dir, "metrics.jsonl"))
if sorted(s2) != list(range(1, steps + 1)):
    problems.append(f"soak metrics.jsonl has {len(s2)} step records, not steps 1..{steps}")
bad = [k for k in s1 if s1[k] != s2.get(k)]
if bad:
    problems.append(f"{len(bad)} step records differ, first at step {bad[0]}: {s1[bad[0]]} vs "
                    f"{s2.get(bad[0])}")
if v1 != v2:
    problems.append(f"validation losses differ: {v1} vs {v2}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"final weights equal: {len(files)} files ({', '.join(files)}; {floats} values per array), "
      f"parameters, AdamW m and v bit-identical; loss curve equal ({len(s2)} steps, "
      f"{len(v2)} validations, full precision)")
PY
)
compare=$?

# --- Summary -------------------------------------------------------------------------------------
echo
echo "kill soak: $kills kills of job $job ($steps steps, $workers worker(s) + $shards shard(s)," \
  "checkpoint every $ckpt_interval, seed $seed)"
printf '%4s %7s  %-12s %-8s %5s %5s %5s %6s %7s\n' \
  kill time_s victim state step ckpt epoch "epoch'" again_s
for r in "${row[@]}"; do echo "$r"; done
echo "(time_s: since the soak job was submitted; state, step, ckpt: the job's state, step and last"
echo " committed checkpoint just before the kill; epoch: its epoch then; epoch', again_s: its epoch"
echo " and the time when it next ran again, after this kill and any quick one that followed)"
restarts=$(grep -c "coordinator restarted: job requeued\|restarting as epoch" "$tmp/job-$job.log")
echo "kills by victim: coordinator ${killed_by_role[coordinator]}," \
  "worker ${killed_by_role[worker]}, shard ${killed_by_role[shard]}"
echo "restarts of the job: $epoch (final epoch; $restarts requeue lines in its log)"
echo "time: uninterrupted job ${ref_s}s (with setup), soak job ${soak_s}s, total $(elapsed)s"
echo "$result"
if [ "$compare" != 0 ]; then
  echo "kill soak: FAIL"
  exit 1
fi
echo "kill soak: PASS"
