#!/usr/bin/env bash
# Static checks of deploy/ (deploy/README.md "Checks"):
#   promtool-config  promtool check config deploy/prometheus/prometheus.yml (and its rule files)
#   promtool-rules   promtool check rules deploy/prometheus/alerts.yml
#   promtool-test    promtool test rules deploy/prometheus/alerts_test.yml
#   schema           every manifest against the Kubernetes schemas (npm kubernetes-models), unknown
#                    fields, references; plus `kubectl kustomize` output when kubectl is installed
#   policy           resource limits, non-root, read-only root fs, no privilege escalation, probes,
#                    and a runtime image stage without compilers or -dev packages
#   metrics          every metric and label of the dashboard and the alert rules is exported by
#                    the C++ sources
# Needs: promtool (Debian package prometheus), node, and the npm packages of
# deploy/checks/package.json in deploy/checks/node_modules (npm ci --prefix deploy/checks).
# Prints each failing check's messages, then one summary line; exits 1 if any check failed.
#
#   scripts/deploy_check.sh                 # checks deploy/ of this checkout
#   DEPLOY_DIR=/tmp/copy/deploy scripts/deploy_check.sh   # checks a copy (the checks' own tests)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
deploy="${DEPLOY_DIR:-$root/deploy}"
checks="$root/deploy/checks"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0
failed_names=()
skipped=()

# run NAME COMMAND...: quiet on success, the command's output on failure.
run() {
  local name="$1"
  shift
  if "$@" > "$tmp/out" 2>&1; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failed_names+=("$name")
    echo "--- $name FAILED: $*"
    sed 's/^/  /' "$tmp/out"
  fi
}

missing() {
  echo "$1"
  return 1
}

# Debian's promtool is built without Kubernetes service discovery ("field kubernetes_sd_configs
# not found"), so its config check sees a copy in which each kubernetes_sd_configs is replaced
# by one static placeholder target; everything else (relabel rules, regexes, rule files) is
# checked as written.
promtool_config() {
  local config="$deploy/prometheus/prometheus.yml"
  if promtool check config --syntax-only "$config" > "$tmp/promtool-direct" 2>&1; then
    promtool check config "$config"
    return
  fi
  grep -q "kubernetes_sd_configs not found" "$tmp/promtool-direct" || {
    cat "$tmp/promtool-direct"
    return 1
  }
  mkdir -p "$tmp/prometheus"
  cp "$deploy"/prometheus/*.yml "$tmp/prometheus/"
  node -e '
    const { YAML } = require(process.argv[1] + "/lib.cjs");
    const fs = require("fs");
    const file = process.argv[2];
    const config = YAML.parse(fs.readFileSync(file, "utf8"));
    for (const job of config.scrape_configs || []) {
      if (job.kubernetes_sd_configs) {
        delete job.kubernetes_sd_configs;
        job.static_configs = [{ targets: ["kubernetes-sd-placeholder:9100"] }];
      }
    }
    fs.writeFileSync(file, YAML.stringify(config));
  ' "$checks" "$tmp/prometheus/prometheus.yml" || return 1
  echo "(kubernetes_sd_configs replaced by a static target: this promtool lacks Kubernetes SD)"
  promtool check config "$tmp/prometheus/prometheus.yml"
}

schema() {
  if command -v kubectl > /dev/null 2>&1; then
    kubectl kustomize "$deploy" > "$tmp/rendered.yaml" || return 1
    node "$checks/schema.cjs" "$deploy" "$tmp/rendered.yaml"
  else
    skipped+=("kustomize rendering (no kubectl)")
    node "$checks/schema.cjs" "$deploy"
  fi
}

have_promtool=1
command -v promtool > /dev/null 2>&1 || have_promtool=0
have_node=1
command -v node > /dev/null 2>&1 && [ -d "$checks/node_modules/kubernetes-models" ] || have_node=0
no_promtool="promtool not found: apt-get install prometheus (scripts/setup.sh)"
no_node="node or $checks/node_modules missing: npm ci --prefix deploy/checks --no-audit --no-fund (scripts/setup.sh)"

if ((have_promtool)); then
  # promtool resolves rule_files and test files relative to their own directory.
  if ((have_node)); then
    run promtool-config promtool_config
  else
    run promtool-config missing "$no_node"
  fi
  run promtool-rules promtool check rules "$deploy/prometheus/alerts.yml"
  run promtool-test promtool test rules "$deploy/prometheus/alerts_test.yml"
else
  run promtool-config missing "$no_promtool"
  run promtool-rules missing "$no_promtool"
  run promtool-test missing "$no_promtool"
fi
if ((have_node)); then
  # schema() records a skip in this shell, so it is not run through a pipe or subshell.
  if schema > "$tmp/schema.out" 2>&1; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failed_names+=(schema)
    echo "--- schema FAILED"
    sed 's/^/  /' "$tmp/schema.out"
  fi
  run policy node "$checks/policy.cjs" "$deploy"
  run metrics node "$checks/metrics.cjs" "$deploy" "$root"
else
  run schema missing "$no_node"
  run policy missing "$no_node"
  run metrics missing "$no_node"
fi

((${#skipped[@]})) && echo "deploy_check: skipped: ${skipped[*]}"
((failed)) && echo "deploy_check: failed: ${failed_names[*]}"
echo "deploy_check: $passed passed, $failed failed"
((failed == 0))
