// Metric-name check of the dashboard and the alert rules (scripts/deploy_check.sh, check d).
//
//   node deploy/checks/metrics.cjs DEPLOY_DIR SOURCE_ROOT
//
// Every metric a Grafana query (panel targets, template variables) or an alert rule names must be
// exported by the C++ code under SOURCE_ROOT (a "loopmoe_..." or "process_..." string literal in a
// .cc/.h file that mentions Prometheus, outside build trees and tests/; histograms also give
// _bucket, _sum, _count), or be `up`, which Prometheus writes for every target itself. Every label they match,
// group by, or print (legendFormat {{x}}, $labels.x) must be exported by that code too (a
// {"label", ...} pair there), or be a target label every scrape job of prometheus.yml sets (job,
// instance, and the intersection of the jobs' relabelled / static labels: not `pod`, which only
// Kubernetes has), or `le` of a histogram.
"use strict";
const fs = require("fs");
const path = require("path");
const { loadYaml, walk } = require("./lib.cjs");

const PROMETHEUS_SERIES = new Set(["up"]);  // written by Prometheus for every scrape target
const KEYWORDS = new Set([
  "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
  "offset", "bool", "atan2", "inf", "nan", "Inf", "NaN", "start", "end",
  // aggregation operators may stand before their `by (...)` clause
  "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
  "topk", "quantile", "limitk", "limit_ratio",
]);

// ---- what the code exports ---------------------------------------------------------------------
function exportedByCode(root) {
  const files = walk(root, /\.(cc|h|cpp|hpp)$/, (name) =>
    name === ".git" || name === "node_modules" || name === "tests" || name === "deploy" || /^build/.test(name));
  const metrics = new Set();
  const labels = new Set();
  const histograms = new Set();
  const where = {};
  for (const file of files) {
    const text = fs.readFileSync(file, "utf8");
    if (!/prometheus/i.test(text)) continue;
    // loopmoe_* and the standard process_* series (common/process_stats.cc)
    for (const m of text.matchAll(/"((?:loopmoe|process)_[a-z0-9_]+)"/g)) {
      metrics.add(m[1]);
      where[m[1]] = path.relative(root, file);
    }
    for (const m of text.matchAll(/BuildHistogram\(\)\s*\.Name\("([a-z0-9_]+)"\)/g)) histograms.add(m[1]);
    for (const m of text.matchAll(/MetricType::Histogram[\s\S]{0,200}?name\s*=\s*"([a-z0-9_]+)"/g)) histograms.add(m[1]);
    // {"name", value} label pairs; {"live", "dead"} (a list of two literals) is not one
    for (const m of text.matchAll(/\{\s*"([a-z_][a-z0-9_]*)"\s*,(?!\s*")/g)) labels.add(m[1]);
  }
  for (const h of histograms) {
    for (const suffix of ["_bucket", "_sum", "_count"]) metrics.add(h + suffix);
  }
  return { metrics, labels, histograms, where, files: files.length };
}

// Target labels every scrape job of prometheus.yml attaches.
function commonTargetLabels(config) {
  let common = null;
  for (const job of config.scrape_configs || []) {
    const set = new Set();
    for (const rc of job.relabel_configs || []) {
      if (rc.target_label && !rc.target_label.startsWith("__")) set.add(rc.target_label);
    }
    const statics = job.static_configs || [];
    if (statics.length) {
      // a label counts for static targets only if every target group sets it
      let s = null;
      for (const sc of statics) {
        const keys = new Set(Object.keys(sc.labels || {}));
        s = s === null ? keys : new Set([...s].filter((k) => keys.has(k)));
      }
      for (const k of s || []) set.add(k);
    }
    common = common === null ? set : new Set([...common].filter((k) => set.has(k)));
  }
  return new Set(["job", "instance", ...(common || [])]);
}

// ---- a small PromQL reader: the metric names and label names of an expression ------------------
function readPromQL(expr) {
  const metrics = [];
  const labels = [];
  let s = expr.replace(/\$\{[^}]*\}|\$\w+/g, "VAR");  // Grafana variables
  // label matchers {a="x", b=~"y"} (a bare {} selector is allowed)
  s = s.replace(/\{([^{}]*)\}/g, (_, body) => {
    for (const m of body.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)/g)) {
      labels.push(m[1]);
    }
    return " ";
  });
  s = s.replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, " ");  // remaining strings
  s = s.replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)/g, (_, kw, list) => {
    for (const l of list.split(",")) if (l.trim()) labels.push(l.trim());
    return ` ${kw} `;
  });
  s = s.replace(/\[[^\]]*\]/g, " ");  // ranges and subqueries
  for (const m of s.matchAll(/(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?!\w)(\s*\()?/g)) {
    const name = m[1];
    if (m[2]) continue;  // a function or an aggregation
    if (KEYWORDS.has(name) || name === "VAR") continue;
    metrics.push(name);
  }
  return { metrics, labels };
}

// Grafana template variable queries: label_values(metric, label), label_values(label),
// query_result(expr), metrics(regex), or plain PromQL.
function readTemplateQuery(q) {
  let m = q.match(/^\s*label_values\(\s*(.*?)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$/);
  if (m) {
    const r = readPromQL(m[1]);
    return { metrics: r.metrics, labels: r.labels.concat([m[2]]) };
  }
  m = q.match(/^\s*label_values\(\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$/);
  if (m) return { metrics: [], labels: [m[1]] };
  m = q.match(/^\s*query_result\(([\s\S]*)\)\s*$/);
  if (m) return readPromQL(m[1]);
  return readPromQL(q);
}

function main() {
  const [deployDir, sourceRoot] = process.argv.slice(2);
  if (!deployDir || !sourceRoot) {
    process.stderr.write("usage: node metrics.cjs DEPLOY_DIR SOURCE_ROOT\n");
    process.exit(2);
  }
  const problems = [];
  const code = exportedByCode(sourceRoot);
  if (code.metrics.size === 0) problems.push(`no loopmoe_* metric found in the C++ sources under ${sourceRoot}`);
  let targetLabels = new Set(["job", "instance"]);
  let rulesFile = null;
  try {
    const config = loadYaml(path.join(deployDir, "prometheus", "prometheus.yml"));
    targetLabels = commonTargetLabels(config);
    rulesFile = (config.rule_files || [])[0];
  } catch (e) {
    problems.push(e.message);
  }
  const allowedLabels = new Set([...code.labels, ...targetLabels, "__name__"]);
  let queries = 0;
  const usedMetrics = new Set();

  function check(where, r) {
    queries++;
    for (const name of r.metrics) {
      usedMetrics.add(name);
      if (!code.metrics.has(name) && !PROMETHEUS_SERIES.has(name)) {
        problems.push(`${where}: metric ${name} is not exported by the C++ sources`);
      }
    }
    const histogram = r.metrics.some((n) => n.endsWith("_bucket"));
    for (const l of r.labels) {
      if (l === "le" && histogram) continue;
      if (!allowedLabels.has(l)) {
        problems.push(`${where}: label ${l} is neither exported by the code nor a target label of every scrape job`);
      }
    }
    if (r.metrics.length === 0 && !r.template) problems.push(`${where}: names no metric`);
  }

  // Grafana
  const dashboardFile = path.join(deployDir, "grafana", "loopmoe.json");
  let dashboard = null;
  try {
    dashboard = JSON.parse(fs.readFileSync(dashboardFile, "utf8"));
  } catch (e) {
    problems.push(`${dashboardFile}: ${e.message}`);
  }
  if (dashboard) {
    const panels = [];
    for (const p of dashboard.panels || []) {
      panels.push(p);
      for (const inner of p.panels || []) panels.push(inner);  // collapsed rows
    }
    const ids = new Set();
    for (const p of panels) {
      const where = `grafana panel ${p.id} "${p.title}"`;
      if (ids.has(p.id)) problems.push(`${where}: duplicate panel id`);
      ids.add(p.id);
      if (p.type === "row") continue;
      if (!(p.targets || []).length) problems.push(`${where}: no query`);
      for (const t of p.targets || []) {
        if (!t.expr) {
          problems.push(`${where} target ${t.refId}: no expr`);
          continue;
        }
        const r = readPromQL(t.expr);
        for (const m of (t.legendFormat || "").matchAll(/\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}/g)) r.labels.push(m[1]);
        check(`${where} target ${t.refId}`, r);
      }
    }
    for (const v of ((dashboard.templating || {}).list || [])) {
      if (v.type !== "query") continue;
      const q = typeof v.query === "string" ? v.query : (v.query || {}).query;
      if (!q) continue;
      const r = readTemplateQuery(q);
      r.template = true;
      check(`grafana variable ${v.name}`, r);
    }
  }

  // Alert rules
  if (!rulesFile) {
    problems.push("prometheus.yml: no rule_files");
  } else {
    let rules = null;
    try {
      rules = loadYaml(path.join(deployDir, "prometheus", rulesFile));
    } catch (e) {
      problems.push(e.message);
    }
    let count = 0;
    for (const g of (rules && rules.groups) || []) {
      for (const rule of g.rules || []) {
        count++;
        const name = rule.alert || rule.record;
        const r = readPromQL(String(rule.expr || ""));
        const text = Object.values(rule.annotations || {}).join(" ");
        for (const m of text.matchAll(/\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)/g)) r.labels.push(m[1]);
        check(`rule ${name}`, r);
        if (rule.record) code.metrics.add(rule.record);  // later rules may use it
      }
    }
    if (count === 0) problems.push(`${rulesFile}: no rules`);
  }

  problems.splice(0, problems.length, ...new Set(problems));
  for (const p of problems) process.stdout.write(`metrics: ${p}\n`);
  if (problems.length) {
    process.stdout.write(`metrics: exported by the code: ${[...code.metrics].sort().join(", ")}\n`);
    process.stdout.write(`metrics: labels allowed: ${[...allowedLabels].sort().join(", ")} (+ le with _bucket)\n`);
  }
  process.stdout.write(`metrics: ${queries} queries/rules use ${usedMetrics.size} metric(s); ` +
                       `${code.metrics.size} exported by ${code.files} C++ file(s); ${problems.length} problem(s)\n`);
  process.exit(problems.length ? 1 : 0);
}

main();
