#!/usr/bin/env bash
# Self-test of scripts/deploy_check.sh: each check must fail on a copy of deploy/ broken the way
# it is meant to catch (and the unbroken copy must pass). Nothing in deploy/ is modified.
#
#   bash deploy/checks/selftest.sh
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
ok=0
bad=0

# case_ NAME CHECK MESSAGE [FILE OLD NEW]: copy deploy/, replace OLD (which must occur) by NEW in
# FILE, run the checks; CHECK must be among the failed ones and MESSAGE in the output (an empty
# CHECK: the copy must pass).
case_() {
  local name="$1" check="$2" message="$3"
  rm -rf "$work/deploy"
  (cd "$root" && tar -cf - --exclude=deploy/checks/node_modules deploy) | (cd "$work" && tar -xf -)
  if [ $# -gt 3 ]; then
    python3 - "$work/deploy/$4" "$5" "$6" <<'PY' || { echo "selftest $name: cannot edit $4"; bad=$((bad + 1)); return; }
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
if old not in text:
    sys.exit(f"{path}: {old!r} not found")
open(path, "w").write(text.replace(old, new, 1))
PY
  fi
  local out rc
  out="$(DEPLOY_DIR="$work/deploy" bash "$root/scripts/deploy_check.sh" 2>&1)"
  rc=$?
  if [ -z "$check" ]; then
    if [ $rc -eq 0 ]; then ok=$((ok + 1)); else echo "selftest $name: expected a pass:"; echo "$out"; bad=$((bad + 1)); fi
    return
  fi
  if [ $rc -ne 0 ] && grep -qE "^deploy_check: failed: (.* )?$check( |\$)" <<< "$out" && grep -qF -- "$message" <<< "$out"; then
    ok=$((ok + 1))
  else
    echo "selftest $name: expected '$check' to fail with '$message', got (rc $rc):"
    echo "$out" | tail -20
    bad=$((bad + 1))
  fi
}

case_ unbroken "" ""
case_ relabel-regex promtool-config "error parsing regexp" \
  prometheus/prometheus.yml 'regex: ([^:]+)(?::\d+)?;(\d+)' 'regex: ([^:]+(?::\d+)?;(\d+)'
case_ rule-syntax promtool-rules "parse error" \
  prometheus/alerts.yml 'delta(loopmoe_coordinator_jobs{state="failed"}[10m]) > 0' 'delta(loopmoe_coordinator_jobs{state="failed"}[10m]) >'
case_ rule-threshold promtool-test "LoopMoEHeartbeatStale" \
  prometheus/alerts.yml 'loopmoe_heartbeat_age_seconds > 60' 'loopmoe_heartbeat_age_seconds > 600'
case_ rule-for promtool-test "LoopMoETargetDown" \
  prometheus/alerts.yml 'for: 2m' 'for: 0m'
case_ misspelt-field schema "readOnlyRootFilesytem: unknown field" \
  training-processes.yaml 'readOnlyRootFilesystem: true' 'readOnlyRootFilesytem: true'
case_ wrong-type schema "periodSeconds must be integer" \
  coordinator.yaml 'periodSeconds: 10' 'periodSeconds: "10"'
case_ unlisted schema "network-policies.yaml: not listed in kustomization.yaml" \
  kustomization.yaml '  - network-policies.yaml' ''
case_ no-limits policy "no resources.limits.memory" \
  coordinator.yaml 'memory: 1Gi' 'ephemeral-storage: 1Gi'
case_ root-user policy "runAsUser is 0" \
  training-processes.yaml 'runAsUser: 10001' 'runAsUser: 0'
case_ escalation policy "allowPrivilegeEscalation is true" \
  coordinator.yaml 'allowPrivilegeEscalation: false' 'allowPrivilegeEscalation: true'
case_ dev-in-runtime policy "installs build tools or -dev packages: g++" \
  Dockerfile 'librocksdb7.8 \' 'librocksdb7.8 g++ \'
case_ invented-metric metrics "metric loopmoe_invented_bytes is not exported" \
  grafana/loopmoe.json 'sum by (state) (loopmoe_coordinator_jobs)' 'sum by (state) (loopmoe_coordinator_jobs) + loopmoe_invented_bytes'
case_ kubernetes-only-label metrics "label pod is neither exported" \
  grafana/loopmoe.json 'max by (instance, role) (loopmoe_heartbeat_age_seconds)' 'max by (pod, instance, role) (loopmoe_heartbeat_age_seconds)'
case_ misspelt-alert-metric metrics "metric loopmoe_heartbeat_age_second is not exported" \
  prometheus/alerts.yml 'expr: loopmoe_heartbeat_age_seconds > 60' 'expr: loopmoe_heartbeat_age_second > 60'

echo "deploy_check selftest: $ok passed, $bad failed"
((bad == 0))
