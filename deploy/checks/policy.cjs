// Policy check of deploy/ (scripts/deploy_check.sh, check c).
//
//   node deploy/checks/policy.cjs DEPLOY_DIR
//
// Every container (and init container) of every workload in the manifests listed by
// kustomization.yaml must have:
//   - resources: requests and limits for cpu and memory;
//   - runAsNonRoot: true and a fixed runAsUser other than 0 (container value, else the pod's);
//   - readOnlyRootFilesystem: true; allowPrivilegeEscalation: false (explicitly: the default is
//     true); not privileged; capabilities.drop containing ALL and no capabilities.add;
//   - seccompProfile RuntimeDefault or Localhost (container or pod);
//   - (not init containers) a readiness and a liveness probe;
// and no pod may use hostNetwork, hostPID or hostIPC. The Dockerfile's last stage must install
// no compiler or -dev package and switch to a non-root USER.
"use strict";
const fs = require("fs");
const path = require("path");
const { loadManifests, describe, podSpecOf } = require("./lib.cjs");

function effective(container, pod, key) {
  const c = container.securityContext || {};
  if (c[key] !== undefined) return c[key];
  return (pod.securityContext || {})[key];
}

function checkContainer(c, pod, where, init, problems) {
  const at = `${where} ${init ? "initContainer" : "container"} ${c.name}`;
  const r = c.resources || {};
  for (const kind of ["requests", "limits"]) {
    for (const res of ["cpu", "memory"]) {
      if (!r[kind] || r[kind][res] === undefined) problems.push(`${at}: no resources.${kind}.${res}`);
    }
  }
  if (effective(c, pod, "runAsNonRoot") !== true) problems.push(`${at}: runAsNonRoot is not true`);
  const uid = effective(c, pod, "runAsUser");
  if (uid === undefined) problems.push(`${at}: no runAsUser (a fixed non-root uid)`);
  else if (Number(uid) === 0) problems.push(`${at}: runAsUser is 0 (root)`);
  const sc = c.securityContext || {};
  if (sc.readOnlyRootFilesystem !== true) problems.push(`${at}: readOnlyRootFilesystem is not true`);
  if (sc.allowPrivilegeEscalation !== false) {
    problems.push(`${at}: allowPrivilegeEscalation is ${sc.allowPrivilegeEscalation === undefined ? "unset (defaults to true)" : sc.allowPrivilegeEscalation}`);
  }
  if (sc.privileged === true) problems.push(`${at}: privileged`);
  const caps = sc.capabilities || {};
  if (!(caps.drop || []).includes("ALL")) problems.push(`${at}: capabilities.drop does not contain ALL`);
  if ((caps.add || []).length) problems.push(`${at}: capabilities.add ${JSON.stringify(caps.add)}`);
  const seccomp = effective(c, pod, "seccompProfile");
  if (!seccomp || !["RuntimeDefault", "Localhost"].includes(seccomp.type)) {
    problems.push(`${at}: seccompProfile is not RuntimeDefault`);
  }
  if (!init) {
    if (!c.readinessProbe) problems.push(`${at}: no readinessProbe`);
    if (!c.livenessProbe) problems.push(`${at}: no livenessProbe`);
  }
}

// The last stage of a Dockerfile: packages installed and the USER it runs as.
function checkDockerfile(file, problems) {
  if (!fs.existsSync(file)) {
    problems.push(`${path.basename(file)}: missing`);
    return;
  }
  // Join continuation lines, drop comments.
  const lines = fs.readFileSync(file, "utf8").replace(/\\\n/g, " ").split("\n")
    .map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  let last = -1;
  lines.forEach((l, i) => { if (/^FROM\s/i.test(l)) last = i; });
  if (last < 0) {
    problems.push("Dockerfile: no FROM");
    return;
  }
  if (!lines.slice(0, last).some((l) => /^FROM\s/i.test(l))) {
    problems.push("Dockerfile: single stage (the runtime stage must not be the build stage)");
  }
  const stage = lines.slice(last);
  const forbidden = /(^|\s)(build-essential|gcc(-\d+)?|g\+\+(-\d+)?|clang(-\d+)?|cmake|make|pkg-config|protobuf-compiler(-grpc)?|[\w.+-]+-dev)(?=\s|$|:)/;
  for (const l of stage) {
    const install = l.match(/apt-get\s+(?:-\S+\s+)*install\s+(.*)$/) || l.match(/apt\s+install\s+(.*)$/);
    if (!install) continue;
    const pkgs = install[1].split(/&&|;|\|/)[0];
    const bad = pkgs.split(/\s+/).filter((p) => p && !p.startsWith("-") && forbidden.test(p));
    if (bad.length) problems.push(`Dockerfile runtime stage installs build tools or -dev packages: ${bad.join(" ")}`);
  }
  for (const l of stage) {
    if (/^COPY\s/i.test(l) && !/--from=/.test(l)) {
      problems.push(`Dockerfile runtime stage copies from the build context (${l}); copy the built files --from the build stage`);
    }
  }
  const users = stage.filter((l) => /^USER\s/i.test(l));
  if (!users.length) {
    problems.push("Dockerfile runtime stage has no USER: it would run as root");
  } else {
    const user = users[users.length - 1].split(/\s+/)[1].split(":")[0];
    if (user === "root" || user === "0") problems.push(`Dockerfile runtime stage runs as ${user}`);
  }
}

function main() {
  const deployDir = process.argv[2];
  if (!deployDir) {
    process.stderr.write("usage: node policy.cjs DEPLOY_DIR\n");
    process.exit(2);
  }
  const problems = [];
  let containers = 0;
  let manifests = [];
  try {
    manifests = loadManifests(deployDir, problems).manifests;
  } catch (e) {
    problems.push(e.message);
  }
  for (const m of manifests) {
    const p = podSpecOf(m.doc);
    if (!p) continue;
    const where = describe(m);
    if (!p.spec) {
      problems.push(`${where}: no pod spec at ${p.at}`);
      continue;
    }
    for (const host of ["hostNetwork", "hostPID", "hostIPC"]) {
      if (p.spec[host]) problems.push(`${where}: ${host}`);
    }
    for (const c of p.spec.containers || []) {
      checkContainer(c, p.spec, where, false, problems);
      containers++;
    }
    for (const c of p.spec.initContainers || []) {
      checkContainer(c, p.spec, where, true, problems);
      containers++;
    }
  }
  if (containers === 0) problems.push("no containers found: nothing was checked");
  checkDockerfile(path.join(deployDir, "Dockerfile"), problems);
  problems.splice(0, problems.length, ...new Set(problems));
  for (const p of problems) process.stdout.write(`policy: ${p}\n`);
  process.stdout.write(`policy: ${containers} container(s) and the Dockerfile, ${problems.length} problem(s)\n`);
  process.exit(problems.length ? 1 : 0);
}

main();
