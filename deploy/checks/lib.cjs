// Shared helpers of the deploy/ checks (scripts/deploy_check.sh). CommonJS, Node >= 14.
"use strict";
const fs = require("fs");
const path = require("path");

function requireDep(name) {
  try {
    return require(name);
  } catch (e) {
    process.stderr.write(
      `error: npm package '${name}' is missing under ${__dirname}/node_modules: ` +
        `run 'npm ci --prefix deploy/checks --no-audit --no-fund' (scripts/setup.sh does)\n`);
    process.exit(2);
  }
}

const YAML = requireDep("yaml");

// Every YAML document of a file, parsed; throws with file and line on a syntax error.
function loadYamlDocuments(file) {
  const text = fs.readFileSync(file, "utf8");
  const docs = YAML.parseAllDocuments(text, { prettyErrors: true });
  const out = [];
  for (const doc of docs) {
    if (doc.errors && doc.errors.length) {
      throw new Error(`${file}: ${doc.errors.map((e) => e.message).join("; ")}`);
    }
    const value = doc.toJS({ maxAliasCount: 100 });
    if (value !== null && value !== undefined) out.push(value);
  }
  return out;
}

function loadYaml(file) {
  const docs = loadYamlDocuments(file);
  if (docs.length !== 1) throw new Error(`${file}: expected one YAML document, found ${docs.length}`);
  return docs[0];
}

// The Kubernetes manifests of a deploy directory: the `resources:` of its kustomization.yaml,
// each {file, index, doc}. Also reports files that are not listed, and listed files that are
// missing, as problems.
function loadManifests(deployDir, problems) {
  const kustomization = loadYaml(path.join(deployDir, "kustomization.yaml"));
  const listed = kustomization.resources || [];
  const onDisk = fs
    .readdirSync(deployDir)
    .filter((f) => /\.ya?ml$/.test(f) && f !== "kustomization.yaml")
    .sort();
  for (const f of onDisk) {
    if (!listed.includes(f)) problems.push(`${f}: not listed in kustomization.yaml resources`);
  }
  const manifests = [];
  for (const f of listed) {
    const file = path.join(deployDir, f);
    if (!fs.existsSync(file)) {
      problems.push(`kustomization.yaml: resource ${f} does not exist`);
      continue;
    }
    try {
      loadYamlDocuments(file).forEach((doc, index) => manifests.push({ file: f, index, doc }));
    } catch (e) {
      problems.push(e.message.split("\n")[0]);
    }
  }
  return { kustomization, manifests };
}

function describe(m) {
  const d = m.doc || {};
  return `${m.file}#${m.index} ${d.kind || "?"}/${(d.metadata && d.metadata.name) || "?"}`;
}

// The pod spec and its path of a workload object, or null.
function podSpecOf(doc) {
  if (!doc || typeof doc !== "object") return null;
  switch (doc.kind) {
    case "Pod":
      return { spec: doc.spec, labels: (doc.metadata || {}).labels || {}, at: "spec" };
    case "Deployment":
    case "StatefulSet":
    case "DaemonSet":
    case "ReplicaSet":
    case "Job": {
      const t = (doc.spec || {}).template || {};
      return { spec: t.spec, labels: (t.metadata || {}).labels || {}, at: "spec.template.spec",
               annotations: (t.metadata || {}).annotations || {} };
    }
    case "CronJob": {
      const t = ((((doc.spec || {}).jobTemplate || {}).spec || {}).template) || {};
      return { spec: t.spec, labels: (t.metadata || {}).labels || {},
               at: "spec.jobTemplate.spec.template.spec" };
    }
    default:
      return null;
  }
}

// The files under `root` whose names match `re`, skipping build trees, VCS and npm folders.
function walk(root, re, skip) {
  const out = [];
  const stack = [root];
  while (stack.length) {
    const dir = stack.pop();
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, entry.name);
      if (entry.isDirectory()) {
        if (skip(entry.name, p)) continue;
        stack.push(p);
      } else if (entry.isFile() && re.test(entry.name)) {
        out.push(p);
      }
    }
  }
  return out.sort();
}

module.exports = { YAML, requireDep, loadYaml, loadYamlDocuments, loadManifests, describe, podSpecOf, walk };
