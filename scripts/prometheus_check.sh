#!/usr/bin/env bash
# A real Prometheus against a real `loopmoe cluster up`: every query of the Grafana dashboard
# (deploy/grafana/loopmoe.json) must return series, every alert rule (deploy/prometheus/alerts.yml)
# must evaluate without error and none may fire, and every scrape target must be up
# (deploy/README.md "Checks": what scripts/deploy_check.sh checks statically, this checks live).
#
#   scripts/prometheus_check.sh [--keep] [BUILD_DIR]      (BUILD_DIR default: build)
#   DEPLOY_DIR=/some/copy/deploy scripts/prometheus_check.sh   # checks a copy's dashboard and rules
#
# 1. prepares a tiny dataset from the repository's own Markdown (nothing is downloaded);
# 2. starts `loopmoe cluster up` (secured: TLS + tokens) with 2 workers and 2 expert shards and
#    metrics on, on ports picked free at run time below the kernel's ephemeral range (the
#    processes and Gloo bind port 0 there while starting, so a pre-picked port up there could be
#    taken in between);
# 3. writes a Prometheus config derived from deploy/prometheus/prometheus.yml (its `loopmoe-local`
#    job, same job name and `component` labels, this run's ports; the Kubernetes job is left out:
#    there is no cluster and Debian's build has no Kubernetes discovery), a 1 s scrape and rule
#    evaluation interval and deploy/prometheus/alerts.yml as rule file, and starts `prometheus`
#    with a temporary storage directory;
# 4. submits configs/loopmoe_tiny.toml (shortened: STEPS steps, a validation every EVAL_INTERVAL)
#    and queries Prometheus's HTTP API twice at a fixed evaluation time: while the job runs (once
#    its first validation loss was scraped) and after it succeeded. Grafana variables become:
#    $job = this job's id, $layer and $iteration = their "All" value (.*), $__rate_interval =
#    RATE_INTERVAL (Grafana's rule: at least 4 scrape intervals), $__interval = the scrape
#    interval. Checked: every panel target returns >= 1 series, every template variable query
#    (label_values) returns values (the job's id among them), every alert expression evaluates,
#    every rule's health is "ok" in /api/v1/rules and no alert fires on this healthy run, every
#    target in /api/v1/targets is up (1 + W + S of them, components as configured);
# 5. prints one table, exits 1 listing the failing queries, and always stops what it started
#    (Prometheus, `cluster up` and its processes, the submit) and removes its temporary directory
#    (--keep keeps the directory: logs, Prometheus data, configs).
#
# Needs the binaries loopmoe, loopmoe-service, loopmoe-coordinator, loopmoe-worker and
# loopmoe-expert-shard in BUILD_DIR, Debian's `prometheus` and `promtool`, and /usr/bin/python3
# with PyYAML (python3-yaml). About 1.5 minutes on 2 cores.
set -euo pipefail

WORKERS=2
SHARDS=2
STEPS=40            # of configs/loopmoe_tiny.toml: 1-1.5 s a step on 2 cores (2 workers + 2 shards)
WARMUP_STEPS=10
EVAL_INTERVAL=10    # the first validation loss comes early: the "running" queries wait for it
SCRAPE_INTERVAL=1s
RATE_INTERVAL=10s   # $__rate_interval: Grafana uses max($__interval + scrape, 4 x scrape)
JOB_TIMEOUT=150     # seconds for the job to succeed

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

error() {
  echo "error: $*" >&2
  exit 1
}

keep=0
build=""
while (($#)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --keep) keep=1 ;;
    -*) error "unknown option $1 (see --help)" ;;
    *)
      [ -z "$build" ] || error "at most one BUILD_DIR (see --help)"
      build=$1
      ;;
  esac
  shift
done
repo=$(cd "$(dirname "$0")/.." && pwd)
build=${build:-$repo/build}
[ -d "$build" ] || error "$build: no such build directory (see --help)"
build=$(cd "$build" && pwd)
for b in loopmoe loopmoe-service loopmoe-coordinator loopmoe-worker loopmoe-expert-shard; do
  [ -x "$build/$b" ] || error "$build/$b is missing: cmake --build $build --target $b"
done
command -v prometheus > /dev/null || error "prometheus not found (Debian package prometheus; scripts/setup.sh)"
command -v promtool > /dev/null || error "promtool not found (Debian package prometheus; scripts/setup.sh)"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3) || error "python3 not found"
"$PY" -c 'import yaml' 2> /dev/null || error "$PY cannot import yaml (Debian package python3-yaml)"
deploy=$(cd "${DEPLOY_DIR:-$repo/deploy}" 2> /dev/null && pwd) || error "${DEPLOY_DIR:-$repo/deploy}: no such directory"
dashboard=$deploy/grafana/loopmoe.json
prom_yml=$deploy/prometheus/prometheus.yml
alerts_yml=$deploy/prometheus/alerts.yml
for f in "$dashboard" "$prom_yml" "$alerts_yml" "$repo/configs/loopmoe_tiny.toml"; do
  [ -f "$f" ] || error "$f is missing"
done

started=$(date +%s)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/loopmoe-prometheus-check.XXXXXX")
cluster_pid=""
prom_pid=""
follow_pid=""
bg_pid=""

# wait_gone PID SECONDS: true once PID has exited (and been reaped) within SECONDS.
wait_gone() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2> /dev/null || return 0
    sleep 0.1
  done
  return 1
}

# Processes still running whose command line names this run's temporary directory (unique per
# run): what `cluster up` started if it could not stop them itself.
leftovers() {
  local d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$pid" = "$$" ] && continue
    grep -qaF "$tmp/" "$d/cmdline" 2> /dev/null && echo "$pid"
  done
  return 0
}

cleanup() {
  local rc=$? pid
  set +e
  trap - EXIT INT TERM
  [ -n "$follow_pid" ] && kill "$follow_pid" 2> /dev/null
  [ -n "$bg_pid" ] && kill "$bg_pid" 2> /dev/null
  if [ -n "$prom_pid" ] && kill -0 "$prom_pid" 2> /dev/null; then
    kill -TERM "$prom_pid"
    wait_gone "$prom_pid" 15 || kill -KILL "$prom_pid"
  fi
  # SIGTERM: cluster up stops its processes in order (SIGTERM, SIGKILL after 10 s) and exits.
  if [ -n "$cluster_pid" ] && kill -0 "$cluster_pid" 2> /dev/null; then
    kill -TERM "$cluster_pid"
    wait_gone "$cluster_pid" 25 || kill -KILL "$cluster_pid"
  fi
  wait 2> /dev/null
  for pid in $(leftovers); do
    grep -qaF "$tmp/" "/proc/$pid/cmdline" 2> /dev/null || continue  # gone meanwhile (or a grep)
    echo "prometheus_check: stopping leftover process $pid: $(tr '\0' ' ' 2> /dev/null < "/proc/$pid/cmdline" | cut -c1-120)" >&2
    kill -KILL "$pid" 2> /dev/null
  done
  if ((keep)); then
    echo "prometheus_check: kept $tmp" >&2
  else
    rm -rf "$tmp"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "prometheus_check: interrupted, stopping everything" >&2; exit 130' INT
trap 'echo "prometheus_check: terminated, stopping everything" >&2; exit 143' TERM

# show_logs FILE...: the end of each log, after an error.
show_logs() {
  local f
  for f in "$@"; do
    [ -f "$f" ] || continue
    echo "--- $f" >&2
    tail -n 15 "$f" >&2
  done
}

cat > "$tmp/check.py" << 'PY'
"""The Python half of scripts/prometheus_check.sh: ports, the Prometheus config, the queries."""
import json, math, random, re, socket, sys, time, urllib.error, urllib.parse, urllib.request

import yaml

# Panels that cannot return a series in this run, with the reason the table prints as
# "n/a (why)". None today: every panel has series both while the job runs and after it.
#   (panel title, refId): "why",
EXCEPTIONS = {}


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def pick_ports(n):
    """n consecutive ports free on 127.0.0.1, below the ephemeral range when there is room."""
    lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    first, last = (10000, lo - n) if lo - n > 11000 else (hi + 1, 65535 - n)
    for _ in range(500):
        base = random.randint(first, last)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    fail(f"no {n} consecutive free ports in {first}-{last + n}")


def write_config(src, dst, alerts, metrics_base, workers, shards, interval):
    cfg = yaml.safe_load(open(src))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    if "loopmoe-local" not in jobs:
        fail(f"{src}: no scrape job loopmoe-local")
    local = jobs["loopmoe-local"]
    groups = {g.get("labels", {}).get("component"): g for g in local.get("static_configs", [])}
    want = {"coordinator": [metrics_base],
            "worker": [metrics_base + 1 + i for i in range(workers)],
            "expert-shard": [metrics_base + 1 + workers + j for j in range(shards)]}
    if set(groups) != set(want):
        fail(f"{src}: loopmoe-local's static_configs have components {sorted(map(str, groups))}, "
             f"expected {sorted(want)}")
    for component, ports in want.items():
        groups[component]["targets"] = [f"127.0.0.1:{p}" for p in ports]
    cfg["scrape_configs"] = [local]  # loopmoe-pods: Kubernetes only
    cfg.setdefault("global", {}).update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    cfg["rule_files"] = [alerts]
    with open(dst, "w") as f:
        f.write("# Written by scripts/prometheus_check.sh from " + src + "\n")
        yaml.safe_dump(cfg, f, sort_keys=False)


class Prometheus:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def get(self, path, **params):
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=20) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad query; the body says why
            try:
                body = json.load(e)
            except Exception:
                return None, f"HTTP {e.code}"
        except Exception as e:
            return None, str(e)
        if body.get("status") != "success":
            return None, f'{body.get("errorType", "")}: {body.get("error", body)}'
        return body["data"], None

    def query(self, expr, at):
        data, err = self.get("/api/v1/query", query=expr, time=f"{at:.3f}")
        if err:
            return None, err
        if data["resultType"] != "vector":
            return None, f"result type {data['resultType']}, expected a vector"
        return data["result"], None

    def targets(self):
        data, err = self.get("/api/v1/targets", state="active")
        if err:
            fail(f"targets API: {err}")
        return data["activeTargets"]


def wait_targets(prom, expected, timeout):
    deadline = time.time() + timeout
    while True:
        ts = prom.targets()
        up = [t for t in ts if t["health"] == "up"]
        if len(ts) == expected and len(up) == expected:
            return
        if time.time() > deadline:
            fail(f"after {timeout} s {len(up)} of {len(ts)} targets up, expected {expected}: " +
                 "; ".join(f'{t["scrapeUrl"]} {t["health"]} {t.get("lastError", "")}' for t in ts))
        time.sleep(0.5)


VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr, values):
    unknown = []

    def rep(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            unknown.append(name)
            return m.group(0)
        return values[name]
    out = VAR.sub(rep, expr)
    return out, unknown


def dashboard_targets(dashboard):
    """(title, refId, expr) of every panel target, rows and nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t.get("refId", "?"), t.get("expr")))
    walk(dashboard.get("panels", []))
    return out


def variable_values(dashboard, job_id, rate, interval):
    values = {"__rate_interval": rate, "__interval": interval, "__range": "5m"}
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        # "All" is the saved selection; $job is narrowed to this run's job (a single value is
        # what Grafana substitutes when one job is picked).
        values[v["name"]] = v.get("allValue") or ".*"
    if "job" in values:
        values["job"] = re.escape(job_id)
    return values


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    if not m:
        fail(f"cannot read duration {duration}")
    return int(m.group(1)) * units[m.group(2)]


def check(args):
    url, dashboard_path, alerts_path, job_id, phase, out_path = args[:6]
    workers, shards, rate, interval, timeout = int(args[6]), int(args[7]), args[8], args[9], float(args[10])
    prom = Prometheus(url)
    dashboard = json.load(open(dashboard_path))
    values = variable_values(dashboard, job_id, rate, interval)
    jsel = f'job_id="{job_id}"'

    def present(expr, at):
        res, err = prom.query(expr, at)
        return bool(res) and not err

    # The evaluation time: while the job runs, once its first validation loss, its step counters'
    # increase and its expert series were scraped; after it, once the coordinator counts it
    # succeeded. Every query of the phase is evaluated at that one time.
    deadline = time.time() + timeout
    while True:
        at = time.time() - 2  # 2 scrape intervals back: every sample up to `at` is ingested
        if phase == "running":
            if present('loopmoe_coordinator_jobs{state=~"failed|cancelled"} > 0', at):
                fail(f"job {job_id} failed or was cancelled before the running phase")
            if present('loopmoe_coordinator_jobs{state="succeeded"} > 0', at):
                fail(f"job {job_id} finished before the running phase could be checked "
                     f"(its first validation loss came too late): raise STEPS")
            # Every process's series: the targets are scraped at different moments, so one
            # worker may show its first validation loss a scrape before the other.
            ready = (present('loopmoe_coordinator_jobs{state="running"} == 1', at)
                     and present(f"loopmoe_job_step{{{jsel}}}", at)
                     and present(f"count(loopmoe_validation_loss{{{jsel}}}) == {workers}", at)
                     and present(f"loopmoe_expert_overload_factor{{{jsel},rank=\"0\"}}", at)
                     and present(f'count(increase(loopmoe_steps_total{{{jsel},role="worker"}}[{rate}]) > 0) == {workers}', at)
                     and present(f'count(increase(loopmoe_steps_total{{{jsel},role="expert_shard"}}[{rate}]) > 0) == {shards}', at))
        else:
            ready = (present('loopmoe_coordinator_jobs{state="succeeded"} == 1', at)
                     and present(f"loopmoe_job_step{{{jsel}}}", at))
        if ready:
            break
        if time.time() > deadline:
            fail(f"phase {phase}: the job's series did not appear in Prometheus within {timeout:.0f} s")
        time.sleep(1)
    if phase == "after":
        # What the dashboard shows once the job is over: its counters flat for a whole rate window.
        time.sleep(seconds(rate) + 2)
        at = time.time() - 2

    rows = []
    # Targets.
    targets = prom.targets()
    expected = {"coordinator": 1, "worker": workers, "expert-shard": shards}
    counts = {}
    for t in sorted(targets, key=lambda t: t["labels"].get("instance", "")):
        comp = t["labels"].get("component", "?")
        counts[comp] = counts.get(comp, 0) + 1
        ok = t["health"] == "up"
        rows.append(dict(kind="target", name=f'{t["labels"].get("job")} {comp} {t["labels"].get("instance")}',
                         expr=t["scrapeUrl"], count=1 if ok else 0,
                         error=None if ok else f'{t["health"]}: {t.get("lastError", "")}'))
    if counts != expected:
        rows.append(dict(kind="target", name="target count", expr="/api/v1/targets", count=len(targets),
                         error=f"components {counts}, expected {expected}"))
    # Template variables (label_values(SELECTOR, LABEL), as Grafana's series lookup).
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("definition") or (v.get("query") or {}).get("query", "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q)
        row = dict(kind="variable", name=f'${v["name"]}', expr=q, count=0, error=None)
        rows.append(row)
        if not m:
            row["error"] = "not a label_values(SELECTOR, LABEL) query"
            continue
        selector, unknown = substitute(m.group(1), values)
        if unknown:
            row["error"] = f"unknown variable(s) {unknown}"
            continue
        data, err = prom.get("/api/v1/series", **{"match[]": selector, "start": f"{at - 300:.3f}",
                                                   "end": f"{at:.3f}"})
        if err:
            row["error"] = err
            continue
        found = sorted({s[m.group(2)] for s in data if m.group(2) in s}, key=lambda x: (len(x), x))
        row["count"] = len(found)
        row["values"] = found
        if v["name"] == "job" and job_id not in found:
            row["error"] = f"job {job_id} not among {found}"
    # Panels.
    for title, ref, expr in dashboard_targets(dashboard):
        row = dict(kind="panel", name=f"{title} [{ref}]", expr=expr or "", count=0, error=None)
        rows.append(row)
        if (title, ref) in EXCEPTIONS:
            row["exception"] = EXCEPTIONS[(title, ref)]
        if not expr:
            row["error"] = "no expr"
            continue
        query, unknown = substitute(expr, values)
        if unknown:
            row["error"] = f"unknown Grafana variable(s) {unknown}"
            continue
        row["query"] = query
        res, err = prom.query(query, at)
        if err:
            row["error"] = err
            continue
        row["count"] = len(res)
        row["nan"] = sum(1 for s in res if math.isnan(float(s["value"][1])))
        row["sample"] = [dict(s["metric"], value=s["value"][1]) for s in res[:5]]  # for --keep
    # Alert rules: each expression evaluates; each rule's own evaluation is healthy; none fires.
    rules_cfg = yaml.safe_load(open(alerts_path))
    data, err = prom.get("/api/v1/rules")
    if err:
        fail(f"rules API: {err}")
    loaded = {r["name"]: r for g in data["groups"] for r in g["rules"]}
    for group in rules_cfg.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            row = dict(kind="alert" if "alert" in rule else "record", name=name,
                       expr=" ".join(str(rule["expr"]).split()), count=0, error=None)
            rows.append(row)
            res, err = prom.query(str(rule["expr"]), at)
            if err:
                row["error"] = err
                continue
            row["count"] = len(res)
            live = loaded.get(name)
            if live is None:
                row["error"] = "not loaded by Prometheus (/api/v1/rules)"
                continue
            row["state"] = live.get("state", "")
            if live.get("health") != "ok":
                row["error"] = f'rule health {live.get("health")}: {live.get("lastError", "")}'
            elif live.get("state") == "firing":
                row["error"] = "fires on a healthy run: " + "; ".join(
                    json.dumps(a.get("labels", {})) for a in live.get("alerts", []))
    json.dump(dict(phase=phase, time=at, rows=rows), open(out_path, "w"), indent=1)


def report(args):
    phases = [json.load(open(p)) for p in args]
    names = [p["phase"] for p in phases]
    keyed = {}
    order = []
    for p in phases:
        for r in p["rows"]:
            key = (r["kind"], r["name"], r["expr"])
            if key not in keyed:
                keyed[key] = {}
                order.append(key)
            keyed[key][p["phase"]] = r
    lines, failures = [], []
    for key in order:
        kind, name, expr = key
        cells, errors, exception = [], [], None
        for ph in names:
            r = keyed[key].get(ph)
            if r is None:
                cells.append("-")
                errors.append(f"{ph}: missing")
                continue
            exception = r.get("exception", exception)
            cell = str(r["count"])
            if kind == "target":
                cell = "up" if r["count"] else "DOWN"
            elif r.get("nan"):
                cell += f" ({r['nan']} NaN)" if r["nan"] < r["count"] else " (NaN)"
            if r.get("state"):
                cell += f" {r['state']}"
            cells.append(cell)
            if r.get("error"):
                errors.append(f"{ph}: {r['error']}")
            elif kind in ("panel", "variable") and r["count"] == 0:
                errors.append(f"{ph}: no series" if kind == "panel" else f"{ph}: no values")
        if exception is not None:
            result = f"n/a ({exception})"
        elif errors:
            result = "FAIL"
            failures.append((kind, name, expr, errors))
        else:
            result = "ok"
        lines.append((kind, name, *cells, result, expr))
    header = ("kind", "name", *names, "result", "expression")
    widths = [max(len(str(l[i])) for l in [header] + lines) for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths) + "  {}"
    print(fmt.format(*header))
    for l in lines:
        print(fmt.format(*l))
    print("series counts at each phase's evaluation time; panels need >= 1 series, alert rules "
          "only need to evaluate (0 series = not firing), their state is Prometheus's")
    if failures:
        print(f"\n{len(failures)} check(s) FAILED:")
        for kind, name, expr, errors in failures:
            print(f"  {kind} {name}: {expr}")
            for e in errors:
                print(f"      {e}")
        return 1
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ports":
        print(pick_ports(int(args[0])))
    elif cmd == "config":
        write_config(args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5]), args[6])
    elif cmd == "wait-targets":
        wait_targets(Prometheus(args[0]), int(args[1]), float(args[2]))
    elif cmd == "check":
        check(args)
    elif cmd == "report":
        sys.exit(report(args))
    else:
        fail(f"unknown command {cmd}")
PY
py() { "$PY" "$tmp/check.py" "$@"; }
# bg PROGRAM ARGS...: runs PROGRAM (not a shell function: bg_pid must be its pid) and waits for it
# in a way a signal interrupts (bash runs a trap only after a foreground command ends; `timeout`
# or CI killing this script must not wait for it).
bg() {
  "$@" &
  bg_pid=$!
  wait "$bg_pid"
}

# 1. Data: the repository's Markdown, a 512-token vocabulary (the config's 4096 is an upper bound).
mkdir -p "$tmp/text"
for f in "$repo/README.md" "$repo"/docs/*.md; do
  cp "$f" "$tmp/text/$(basename "$f" .md).txt"  # a directory input is read as its *.txt
done
bg "$build/loopmoe" data prepare --input "$tmp/text" --vocab 512 --out "$tmp/data" \
  > "$tmp/prepare.log" 2>&1 || { show_logs "$tmp/prepare.log"; error "loopmoe data prepare failed"; }
"$PY" - "$repo/configs/loopmoe_tiny.toml" "$tmp/job.toml" "$tmp/data" "$STEPS" "$WARMUP_STEPS" "$EVAL_INTERVAL" << 'PY'
import re, sys
src, dst, data, steps, warmup, eval_interval = sys.argv[1:]
text = open(src).read()
for key, value in [("steps", steps), ("warmup_steps", warmup), ("eval_interval", eval_interval),
                   ("eval_batches", "2"), ("checkpoint_interval", steps), ("log_interval", "5"),
                   ("dir", f'"{data}"')]:
    text, n = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, flags=re.M)
    if n != 1:
        sys.exit(f"error: {src}: {n} lines set {key}, expected 1")
open(dst, "w").write(text)
PY

# 2. The cluster: coordinator gRPC port, Prometheus port, then 1 + W + S metrics ports (the
# contiguous block --metrics-base-port needs). A port taken between picking and binding only
# means another try.
nports=$((3 + WORKERS + SHARDS))
for attempt in 1 2 3; do
  base=$(py ports "$nports")
  coord_port=$base
  prom_port=$((base + 1))
  metrics_base=$((base + 2))
  rm -rf "$tmp/cluster"
  "$build/loopmoe" cluster up --workers "$WORKERS" --shards "$SHARDS" --port "$coord_port" \
    --dir "$tmp/cluster" --data-root "$tmp" --metrics-base-port "$metrics_base" \
    > "$tmp/cluster-up.log" 2>&1 &
  cluster_pid=$!
  for _ in $(seq 1200); do
    [ -f "$tmp/cluster/cluster.env" ] && break
    kill -0 "$cluster_pid" 2> /dev/null || break
    sleep 0.1
  done
  [ -f "$tmp/cluster/cluster.env" ] && break
  wait_gone "$cluster_pid" 30 || error "cluster up neither came up nor exited within 150 s"
  wait "$cluster_pid" 2> /dev/null || true
  cluster_pid=""
  if [ "$attempt" -lt 3 ] && cat "$tmp/cluster-up.log" "$tmp/cluster/logs/"*.log 2> /dev/null |
    grep -qiE 'in use|cannot listen|failed to add|bind'; then
    echo "prometheus_check: a port was taken (attempt $attempt), picking others" >&2
    continue
  fi
  show_logs "$tmp/cluster-up.log" "$tmp/cluster/logs/"*.log
  error "loopmoe cluster up failed (log above)"
done
# shellcheck disable=SC1091
source "$tmp/cluster/cluster.env"  # LOOPMOE_COORDINATOR, LOOPMOE_CA, LOOPMOE_TOKEN_FILE
echo "cluster up: coordinator $LOOPMOE_COORDINATOR, $WORKERS workers, $SHARDS shards, metrics on 127.0.0.1:$metrics_base-$((metrics_base + WORKERS + SHARDS))"

# 3. Prometheus.
py config "$prom_yml" "$tmp/prometheus.yml" "$alerts_yml" "$metrics_base" "$WORKERS" "$SHARDS" "$SCRAPE_INTERVAL"
promtool check config "$tmp/prometheus.yml" > "$tmp/promtool.log" 2>&1 ||
  { show_logs "$tmp/promtool.log"; error "promtool check config rejects the derived $tmp/prometheus.yml"; }
for attempt in 1 2 3; do
  prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/prometheus-data" \
    --web.listen-address="127.0.0.1:$prom_port" --log.level=warn > "$tmp/prometheus.log" 2>&1 &
  prom_pid=$!
  ready=""
  for _ in $(seq 300); do
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$prom_port/-/ready" > /dev/null 2>&1 && ready=1 && break
    kill -0 "$prom_pid" 2> /dev/null || break
    sleep 0.1
  done
  [ -n "$ready" ] && break
  kill "$prom_pid" 2> /dev/null || true
  wait "$prom_pid" 2> /dev/null || true
  prom_pid=""
  if [ "$attempt" -lt 3 ] && grep -qi 'in use' "$tmp/prometheus.log"; then
    prom_port=$(py ports 1)
    continue
  fi
  show_logs "$tmp/prometheus.log"
  error "prometheus did not become ready on 127.0.0.1:$prom_port"
done
prom=http://127.0.0.1:$prom_port
echo "prometheus: $prom (scrape and rule evaluation every $SCRAPE_INTERVAL)"
bg "$PY" "$tmp/check.py" wait-targets "$prom" $((1 + WORKERS + SHARDS)) 30 ||
  { show_logs "$tmp/prometheus.log"; error "not every target came up in Prometheus"; }

# 4. The job, and the queries while it runs and after it.
"$build/loopmoe" submit "$tmp/job.toml" --workers "$WORKERS" --shards "$SHARDS" --threads 1 \
  --name prometheus-check --follow > "$tmp/follow.log" 2>&1 &
follow_pid=$!
job=""
for _ in $(seq 300); do
  job=$(grep -oE 'submitted job [0-9A-Za-z_-]+' "$tmp/follow.log" | head -1 | cut -d' ' -f3) || true
  [ -n "$job" ] && break
  kill -0 "$follow_pid" 2> /dev/null || break
  sleep 0.1
done
[ -n "$job" ] || { show_logs "$tmp/follow.log"; error "loopmoe submit failed"; }
echo "job $job: configs/loopmoe_tiny.toml, $STEPS steps, validation every $EVAL_INTERVAL"
bg "$PY" "$tmp/check.py" check "$prom" "$dashboard" "$alerts_yml" "$job" running "$tmp/running.json" "$WORKERS" "$SHARDS" \
  "$RATE_INTERVAL" "$SCRAPE_INTERVAL" "$JOB_TIMEOUT" ||
  { show_logs "$tmp/follow.log" "$tmp/prometheus.log"; error "the running-phase queries could not run"; }
wait_gone "$follow_pid" "$JOB_TIMEOUT" || { show_logs "$tmp/follow.log"; error "job $job did not end within $JOB_TIMEOUT s"; }
rc=0
wait "$follow_pid" || rc=$?
follow_pid=""
if [ "$rc" != 0 ] || ! grep -q "succeeded after $STEPS steps" "$tmp/follow.log"; then
  show_logs "$tmp/follow.log" "$tmp/cluster/logs/"*.log
  error "job $job did not succeed (submit --follow exit $rc)"
fi
bg "$PY" "$tmp/check.py" check "$prom" "$dashboard" "$alerts_yml" "$job" after "$tmp/after.json" "$WORKERS" "$SHARDS" \
  "$RATE_INTERVAL" "$SCRAPE_INTERVAL" 30 ||
  { show_logs "$tmp/prometheus.log"; error "the after-phase queries could not run"; }

# 5. The table.
echo
status=0
py report "$tmp/running.json" "$tmp/after.json" || status=1
echo
if ((status)); then
  echo "prometheus_check: FAILED in $(($(date +%s) - started)) s (queries above; --keep keeps the logs and Prometheus data)"
  exit 1
fi
echo "prometheus_check: every dashboard query returned series, every alert rule evaluated, every target up ($(($(date +%s) - started)) s)"
