#!/usr/bin/env bash
# Checks the lock annotations (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED, ...) of the code
# that holds locks: every source file of the comm, runtime, worker, expert_shard, coordinator,
# process and security libraries, of the loopmoe-coordinator / -worker / -expert-shard executables
# and of their test executables is compiled by Clang with -Wthread-safety under our -Werror
# (-DLOOPMOE_THREAD_SAFETY=ON). Compile only (-fsyntax-only, where the analysis runs): nothing is
# linked or run, so the rest of the tree (model/, train/, ...) need not build with Clang. Prints
# `thread-safety: ok`, or the diagnostics and `thread-safety: FAILED`, exiting 1; any warning
# fails. Build directory: $LOOPMOE_TSA_BUILD_DIR (default build-tsa); jobs: $LOOPMOE_TSA_JOBS
# (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${LOOPMOE_TSA_BUILD_DIR:-build-tsa}"
jobs="${LOOPMOE_TSA_JOBS:-$(nproc)}"
log="$dir/thread_safety.log"
targets=(
  loopmoe_comm loopmoe_runtime loopmoe_worker loopmoe_expert_shard loopmoe_runtimes
  loopmoe_coordinator_client loopmoe_coordinator loopmoe_process loopmoe_security
  loopmoe-coordinator loopmoe-worker loopmoe-expert-shard
  loopmoe_comm_tests loopmoe_coordinator_tests loopmoe_process_tests loopmoe_cluster_tests
  loopmoe_security_tests
)
if ! command -v clang++ >/dev/null 2>&1; then
  echo "thread-safety: FAILED (no clang++; scripts/setup.sh installs clang)"
  exit 1
fi
mkdir -p "$dir"
# Configure (compile_commands.json) and generate the gRPC/protobuf headers our sources include.
if ! { CC=clang CXX=clang++ cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release \
  -DLOOPMOE_THREAD_SAFETY=ON -DLOOPMOE_NATIVE=OFF &&
  cmake --build "$dir" -j"$jobs" --target loopmoe_proto; } >"$log" 2>&1; then
  tail -40 "$log"
  echo "thread-safety: FAILED (configure; $log)"
  exit 1
fi
if ! grep -q '^CMAKE_CXX_COMPILER:.*clang' "$dir/CMakeCache.txt"; then
  echo "thread-safety: FAILED ($dir is configured with another compiler; remove it)"
  exit 1
fi
python3 - "$dir" "$jobs" "$log" "${targets[@]}" <<'PY'
import json, re, subprocess, sys
from concurrent.futures import ThreadPoolExecutor

build, jobs, log, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3], set(sys.argv[4:])
units, seen = [], set()
for entry in json.load(open(f"{build}/compile_commands.json")):
    m = re.search(r" -o \S*CMakeFiles/([^/ ]+)\.dir/", entry["command"])
    if m and m.group(1) in targets:
        units.append(entry)
        seen.add(m.group(1))
if seen != targets:
    print(f"thread-safety: FAILED (no sources for {', '.join(sorted(targets - seen))})")
    sys.exit(1)
if "-Wthread-safety" not in units[0]["command"]:
    print("thread-safety: FAILED (-Wthread-safety is not in the compile commands)")
    sys.exit(1)

def check(entry):
    r = subprocess.run(entry["command"] + " -fsyntax-only", shell=True, cwd=entry["directory"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return r.returncode, r.stdout

with ThreadPoolExecutor(max(1, jobs)) as pool:
    results = list(pool.map(check, units))
with open(log, "a") as f:
    for entry, (rc, out) in zip(units, results):
        f.write(f"== {entry['file']}: exit {rc}\n{out}")
failed = [(entry, out) for entry, (rc, out) in zip(units, results) if rc != 0 or out.strip()]
for entry, out in failed:
    sys.stdout.write(out)
if failed:
    print(f"thread-safety: FAILED ({len(failed)} of {len(units)} files; {log})")
    sys.exit(1)
print("thread-safety: ok")
PY
