// Schema validation of the Kubernetes manifests of deploy/ (scripts/deploy_check.sh, check b).
//
//   node deploy/checks/schema.cjs DEPLOY_DIR [RENDERED.yaml]
//
// 1. kustomization.yaml lists every manifest of DEPLOY_DIR, and every listed file exists.
// 2. Every YAML document is validated against the Kubernetes OpenAPI schema with the model class
//    of npm kubernetes-models (`new Deployment(doc).validate()`: types, required fields, enums,
//    formats such as quantities).
// 3. Unknown fields (a misspelt `readOnlyRootFilesytem` is accepted by the schema, which allows
//    additional properties, and silently ignored by the API server's non-strict clients) are
//    reported from the models' TypeScript declarations, which list every field of every type.
// 4. References inside the set: Service / PodDisruptionBudget / NetworkPolicy selectors select
//    some pod template, claimNames exist, probe ports and the prometheus.io/port annotation are
//    declared container ports, the annotation matches --metrics-listen.
// With RENDERED.yaml (`kubectl kustomize DEPLOY_DIR` output), its documents are validated too
// (steps 2 and 3).
"use strict";
const fs = require("fs");
const path = require("path");
const { loadManifests, loadYamlDocuments, describe, podSpecOf, walk } = require("./lib.cjs");

const modelsRoot = path.dirname(require.resolve("kubernetes-models/package.json"));
const apimachineryRoot = path.dirname(require.resolve("@kubernetes-models/apimachinery/package.json"));

// ---- model classes -------------------------------------------------------------------------
function modelFile(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string") return null;
  if (!/^[a-z0-9.]+(\/[a-z0-9]+)?$/.test(apiVersion) || !/^[A-Za-z]+$/.test(kind)) return null;
  const file = path.join(modelsRoot, apiVersion, kind);  // v1/Service, apps/v1/Deployment, ...
  return fs.existsSync(`${file}.js`) ? file : null;
}

// ---- field index from the .d.ts declarations -------------------------------------------------
// interface name (as exported, e.g. IIoK8sApiCoreV1Probe) -> { props: {name: {ref, array, map}} }
let fieldIndex = null;
function buildFieldIndex() {
  const index = {};
  const files = walk(modelsRoot, /\.d\.ts$/, (n) => n === "_schemas")
    .concat(walk(apimachineryRoot, /\.d\.ts$/, (n) => n === "_schemas"));
  for (const file of files) {
    const text = fs.readFileSync(file, "utf8");
    const aliases = {};
    const exportRe = /export \{([^}]*)\}/g;
    let m;
    while ((m = exportRe.exec(text))) {
      for (const part of m[1].split(",")) {
        const a = part.trim().match(/^(\w+) as (\w+)$/);
        if (a) aliases[a[1]] = a[2];
      }
    }
    const ifaceRe = /^export interface (\w+)(?: extends [^{]+)? \{\n([\s\S]*?)^\}/gm;
    while ((m = ifaceRe.exec(text))) {
      const props = {};
      for (const line of m[2].split("\n")) {
        const p = line.match(/^ {4}"([^"]+)"\??: (.*?);?$/);
        if (!p) continue;
        const type = p[2].trim();
        const ref = (type.match(/\bIIoK8s\w+/) || [null])[0];
        props[p[1]] = { ref, array: /^Array<|\[\]$/.test(type), map: type.startsWith("{") };
      }
      index[m[1]] = { props };
      if (aliases[m[1]]) index[aliases[m[1]]] = index[m[1]];
    }
  }
  return index;
}

function rootInterface(file) {
  const text = fs.readFileSync(`${file}.d.ts`, "utf8");
  const m = text.match(/^export interface (\w+)/m);
  return m ? m[1] : null;
}

function unknownFields(value, typeName, at, out) {
  const iface = fieldIndex[typeName];
  if (!iface || value === null || typeof value !== "object" || Array.isArray(value)) return;
  for (const [key, v] of Object.entries(value)) {
    const prop = iface.props[key];
    if (!prop) {
      out.push(`${at}.${key}: unknown field (${typeName.replace(/^IIoK8s(Api|ApimachineryPkgApis)/, "")} has ` +
               `${Object.keys(iface.props).sort().join(", ")})`);
      continue;
    }
    if (!prop.ref || prop.map) continue;
    if (prop.array && Array.isArray(v)) v.forEach((el, i) => unknownFields(el, prop.ref, `${at}.${key}[${i}]`, out));
    else unknownFields(v, prop.ref, `${at}.${key}`, out);
  }
}

function validateDocument(doc, where, problems) {
  if (!doc || typeof doc !== "object" || Array.isArray(doc)) {
    problems.push(`${where}: not a mapping`);
    return;
  }
  const file = modelFile(doc.apiVersion, doc.kind);
  if (!file) {
    problems.push(`${where}: no Kubernetes schema for apiVersion ${doc.apiVersion} kind ${doc.kind}`);
    return;
  }
  const mod = require(file);
  const Model = mod[doc.kind];
  try {
    new Model(doc).validate();
  } catch (e) {
    problems.push(`${where}: ${e.message}`);
  }
  fieldIndex = fieldIndex || buildFieldIndex();
  const root = rootInterface(file);
  if (!root || !fieldIndex[root]) {
    problems.push(`${where}: no field list for ${doc.kind} (kubernetes-models layout changed?)`);
    return;
  }
  const unknown = [];
  unknownFields(doc, root, doc.kind, unknown);
  for (const u of unknown) problems.push(`${where}: ${u}`);
}

// ---- references between the manifests ---------------------------------------------------------
function selects(selector, labels) {
  if (!selector) return false;
  const match = selector.matchLabels || (selector.matchExpressions ? {} : selector);
  if (Object.keys(match).length === 0 && !selector.matchExpressions) return true;  // {} = all pods
  for (const [k, v] of Object.entries(match)) if (labels[k] !== v) return false;
  for (const e of selector.matchExpressions || []) {
    const has = Object.prototype.hasOwnProperty.call(labels, e.key);
    if (e.operator === "In" && !(has && e.values.includes(labels[e.key]))) return false;
    if (e.operator === "NotIn" && has && e.values.includes(labels[e.key])) return false;
    if (e.operator === "Exists" && !has) return false;
    if (e.operator === "DoesNotExist" && has) return false;
  }
  return true;
}

function checkReferences(manifests, problems) {
  const pods = [];
  const claims = new Set();
  const services = new Set();
  for (const m of manifests) {
    const d = m.doc;
    if (d.kind === "PersistentVolumeClaim") claims.add(d.metadata.name);
    if (d.kind === "Service") services.add(d.metadata.name);
    const p = podSpecOf(d);
    if (p && p.spec) pods.push({ m, ...p });
  }
  for (const m of manifests) {
    const d = m.doc;
    const where = describe(m);
    let selector = null;
    if (d.kind === "Service") selector = d.spec && d.spec.selector ? { matchLabels: d.spec.selector } : null;
    if (d.kind === "PodDisruptionBudget" || ["Deployment", "StatefulSet", "DaemonSet"].includes(d.kind)) {
      selector = d.spec && d.spec.selector;
    }
    if (d.kind === "NetworkPolicy") {
      selector = d.spec && d.spec.podSelector;
      for (const rule of (d.spec && d.spec.ingress) || []) {
        for (const peer of rule.from || []) {
          if (peer.podSelector && !peer.namespaceSelector && !pods.some((p) => selects(peer.podSelector, p.labels))) {
            problems.push(`${where}: ingress peer podSelector ${JSON.stringify(peer.podSelector)} selects no pod template`);
          }
        }
      }
    }
    if (selector && !pods.some((p) => selects(selector, p.labels))) {
      problems.push(`${where}: selector ${JSON.stringify(selector)} selects no pod template`);
    }
    if (["Deployment", "StatefulSet", "DaemonSet"].includes(d.kind)) {
      const t = d.spec.template.metadata.labels || {};
      if (d.spec.selector && !selects(d.spec.selector, t)) problems.push(`${where}: spec.selector does not match its own template labels`);
    }
    if (d.kind === "StatefulSet" && d.spec.serviceName && !services.has(d.spec.serviceName)) {
      problems.push(`${where}: serviceName ${d.spec.serviceName} is not a Service here`);
    }
  }
  for (const p of pods) {
    const where = describe(p.m);
    const volumes = new Set(((p.spec.volumes) || []).map((v) => v.name));
    for (const v of p.spec.volumes || []) {
      if (v.persistentVolumeClaim && !claims.has(v.persistentVolumeClaim.claimName)) {
        problems.push(`${where}: volume ${v.name} uses claim ${v.persistentVolumeClaim.claimName}, which is not defined here`);
      }
    }
    const ports = new Map();
    for (const c of p.spec.containers || []) {
      for (const port of c.ports || []) {
        ports.set(port.containerPort, port);
        if (port.name) ports.set(port.name, port);
      }
    }
    for (const c of (p.spec.containers || []).concat(p.spec.initContainers || [])) {
      for (const vm of c.volumeMounts || []) {
        if (!volumes.has(vm.name)) problems.push(`${where}: container ${c.name} mounts undefined volume ${vm.name}`);
      }
      for (const kind of ["startupProbe", "readinessProbe", "livenessProbe"]) {
        const probe = c[kind];
        if (!probe) continue;
        const action = probe.grpc || probe.httpGet || probe.tcpSocket;
        if (action && action.port !== undefined && !ports.has(action.port)) {
          problems.push(`${where}: container ${c.name} ${kind} port ${action.port} is not a declared containerPort`);
        }
      }
    }
    const ann = p.annotations || {};
    if (ann["prometheus.io/scrape"] === "true") {
      const port = Number(ann["prometheus.io/port"]);
      if (!ports.has(port)) problems.push(`${where}: prometheus.io/port ${ann["prometheus.io/port"]} is not a declared containerPort`);
      const args = (p.spec.containers || []).flatMap((c) => (c.command || []).concat(c.args || []));
      const listen = args.find((a) => /^--metrics-listen[= ]/.test(a));
      if (!listen || !listen.endsWith(`:${port}`)) {
        problems.push(`${where}: prometheus.io/port ${port} does not match the container's ${listen || "missing --metrics-listen"}`);
      }
    }
  }
}

// ---- main --------------------------------------------------------------------------------------
function main() {
  const [deployDir, rendered] = process.argv.slice(2);
  if (!deployDir) {
    process.stderr.write("usage: node schema.cjs DEPLOY_DIR [RENDERED.yaml]\n");
    process.exit(2);
  }
  const problems = [];
  let count = 0;
  let manifests = [];
  try {
    manifests = loadManifests(deployDir, problems).manifests;
  } catch (e) {
    problems.push(e.message);
  }
  for (const m of manifests) {
    validateDocument(m.doc, describe(m), problems);
    count++;
  }
  try {
    checkReferences(manifests, problems);
  } catch (e) {
    problems.push(`references: cannot check (${e.message}); fix the problems above first`);
  }
  if (rendered) {
    let docs = [];
    try {
      docs = loadYamlDocuments(rendered);
    } catch (e) {
      problems.push(e.message);
    }
    docs.forEach((doc, i) => {
      validateDocument(doc, `kustomize output #${i} ${doc.kind}/${doc.metadata && doc.metadata.name}`, problems);
      if (!doc.metadata || (doc.kind !== "Namespace" && doc.metadata.namespace !== "loopmoe")) {
        problems.push(`kustomize output #${i} ${doc.kind}: not in namespace loopmoe`);
      }
      count++;
    });
  }
  problems.splice(0, problems.length, ...new Set(problems));
  for (const p of problems) process.stdout.write(`schema: ${p}\n`);
  process.stdout.write(`schema: ${count} document(s), ${problems.length} problem(s)\n`);
  process.exit(problems.length ? 1 : 0);
}

main();
