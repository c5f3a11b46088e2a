#!/usr/bin/env bash
# Builds the deployment image (deploy/Dockerfile, both stages) with podman and runs a job inside it
# the way a hardened cluster pod would: as the image's non-root user, read-only root filesystem,
# all capabilities dropped, no privilege escalation, a tmpfs on /tmp, data on a host volume.
#
# Phases (each timed; a summary table is printed on success and on failure):
#   base     debian:12 and debian:12-slim for the two FROM lines, made once with
#            `debootstrap --variant=minbase bookworm` from the Debian mirror and imported
#            (no registry is reachable); reused when podman already has both
#   build    podman build -f deploy/Dockerfile (context: the repository, minus
#            deploy/Dockerfile.dockerignore)
#   inspect  image size below IMAGE_CHECK_MAX_MB; runtime stage has no compiler and no -dev
#            package, has openssl, runs as a non-root uid
#   prepare  loopmoe data prepare (vocab 4096) on the repository's README.md, docs/*.md and
#            deploy/README.md, in the image
#   cluster  loopmoe cluster up --workers 2 --shards 2 --data-root /vol (TLS and tokens: secured)
#   job      loopmoe submit --follow of configs/loopmoe_tiny.toml cut to IMAGE_CHECK_STEPS steps,
#            run in the same container; must succeed and leave metrics.jsonl, config.toml and
#            the last step's checkpoint under the data root
#   stop     SIGTERM to cluster up: it must stop its processes and exit 0
#
# Usage: scripts/image_check.sh [--keep] [--new-base]
#   --keep      keep the work directory (logs, volume) under /var/tmp for inspection
#   --new-base  make the Debian base images again even if podman has them
#   -h, --help  this text
# Environment:
#   IMAGE_CHECK_STEPS          job steps (default 60)
#   IMAGE_CHECK_TAG            image name (default loopmoe:check)
#   IMAGE_CHECK_MAX_MB         size limit of the image in MB (default 600; single-stage: 1,220)
#   IMAGE_CHECK_BUILD_TIMEOUT  seconds for podman build (default 2100)
#   IMAGE_CHECK_JOB_TIMEOUT    seconds for submit --follow (default 600)
#   DEBIAN_MIRROR              default http://deb.debian.org/debian
#   DEBIAN_SECURITY_MIRROR     default http://deb.debian.org/debian-security
# The timeouts (and debootstrap's 600 s) are several times an idle 2-core machine's times and
# together fit a 90-minute CI run whose other steps take ~33 min.
# Needs root (rootful podman), podman, runc and debootstrap (scripts/setup.sh installs them), and
# HTTP access to the Debian mirrors (debootstrap, and apt in both build stages). Leaves the
# images (base, build cache, IMAGE_CHECK_TAG) in podman's store, no container and no temp dir.
# Exits 0 on success; otherwise 1 after an `error:` line and the tail of the failing step's log.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
keep=""
new_base=""
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    --new-base) new_base=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "error: image_check: unknown argument '$arg' (see --help)" >&2
      exit 2
      ;;
  esac
done

steps=${IMAGE_CHECK_STEPS:-60}
tag=${IMAGE_CHECK_TAG:-loopmoe:check}
max_mb=${IMAGE_CHECK_MAX_MB:-600}
build_timeout=${IMAGE_CHECK_BUILD_TIMEOUT:-2100}
job_timeout=${IMAGE_CHECK_JOB_TIMEOUT:-600}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
for v in IMAGE_CHECK_STEPS IMAGE_CHECK_MAX_MB IMAGE_CHECK_BUILD_TIMEOUT IMAGE_CHECK_JOB_TIMEOUT; do
  [[ "${!v:-1}" =~ ^[1-9][0-9]*$ ]] || {
    echo "error: image_check: $v must be a positive integer, not '${!v}'" >&2
    exit 2
  }
done
if [ "$(id -u)" -ne 0 ]; then
  echo "error: image_check: needs root (rootful podman, debootstrap)" >&2
  exit 1
fi
for tool in podman runc debootstrap; do
  command -v "$tool" > /dev/null || {
    echo "error: image_check: $tool is not installed (bash scripts/setup.sh installs it)" >&2
    exit 1
  }
done

# crun refuses the hybrid cgroup layout of these machines and runc with the systemd cgroup manager
# has no systemd to talk to; the default ulimits podman asks for are above what a CI container may
# set. This file replaces /etc/containers/containers.conf for this script's podman calls only.
work=$(mktemp -d /var/tmp/loopmoe-image-check.XXXXXX)
cat > "$work/containers.conf" << 'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
export CONTAINERS_CONF=$work/containers.conf
podcmd=(podman --runtime runc --cgroup-manager cgroupfs)
pod() { "${podcmd[@]}" "$@"; }

# Every container of this run is named $prefix-*, so the trap can remove them whatever happened.
prefix="loopmoe-image-check-$$"
t0=$(date +%s)
phase_names=()
phase_secs=()
phase=""
phase_t=0
begin() {
  end_phase
  phase=$1
  phase_t=$(date +%s)
  echo "image_check: [$phase] $2"
}
end_phase() {
  if [ -n "$phase" ]; then
    phase_names+=("$phase")
    phase_secs+=($(($(date +%s) - phase_t)))
    phase=""
  fi
}
summary() {
  local i
  echo "image_check: time per phase:"
  for i in "${!phase_names[@]}"; do
    printf '  %-16s %5d s\n' "${phase_names[$i]}" "${phase_secs[$i]}"
  done
  printf '  %-16s %5d s\n' total $(($(date +%s) - t0))
}
# The long steps (build, job) run in the background under `timeout` (which passes a signal on to
# its command) while the script waits, so that INT/TERM reach the trap at once.
child=""
buildah_before=""
cleanup() {
  local rc=$? names n
  trap - EXIT INT TERM
  if [ -n "$phase" ]; then
    phase_names+=("$phase (failed)")
    phase_secs+=($(($(date +%s) - phase_t)))
    phase=""
  fi
  if [ -n "$child" ]; then
    kill -TERM "$child" 2> /dev/null || true
    wait "$child" 2> /dev/null || true
  fi
  names=$(pod ps -a --filter "name=^$prefix-" --format '{{.Names}}' 2> /dev/null || true)
  for n in $names; do
    pod rm -f -t 5 "$n" > /dev/null 2>&1 ||
      echo "image_check: warning: could not remove container $n" >&2
  done
  # An interrupted podman build leaves its working container in storage (podman ps --external)
  # and the RUN step's directory /var/tmp/buildahNNN (removed unless something is mounted in it).
  if [ -n "$buildah_before" ]; then
    for n in $(pod ps -a --external -q --no-trunc 2> /dev/null || true); do
      grep -qx "$n" <<< "$buildah_before" || pod rm -f "$n" > /dev/null 2>&1 || true
    done
    for n in /var/tmp/buildah*; do
      if [ -d "$n" ] && ! grep -qx "$n" <<< "$buildah_before" && ! grep -q " $n/" /proc/self/mounts; then
        rm -rf "$n" || true
      fi
    done
  fi
  ((${#phase_names[@]})) && summary
  if [ -n "$keep" ]; then
    echo "image_check: kept $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "error: image_check: interrupted (SIGINT)" >&2; exit 130' INT
trap 'echo "error: image_check: interrupted (SIGTERM)" >&2; exit 143' TERM

# fail MESSAGE [LOG...]: one error line, then the last lines of each log named.
fail() {
  local msg=$1 f
  shift
  echo "error: image_check: $msg" >&2
  for f in "$@"; do
    [ -s "$f" ] || continue
    echo "--- last 40 lines of ${f#"$work"/}" >&2
    tail -n 40 "$f" >&2
  done
  exit 1
}

# --- base ---------------------------------------------------------------------------------------
if [ -n "$new_base" ] || ! pod image exists debian:12 || ! pod image exists debian:12-slim; then
  begin base "making debian:12 and debian:12-slim with debootstrap from $mirror"
  rootfs=$work/rootfs
  timeout 600 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" \
    > "$work/debootstrap.log" 2>&1 ||
    fail "debootstrap --variant=minbase bookworm $mirror failed or ran over 600 s (network?)" \
      "$work/debootstrap.log" "$rootfs/debootstrap/debootstrap.log"
  # What the official images add to a minbase tree: the updates and security suites, and apt
  # settings that keep downloaded packages and caches out of image layers.
  cat > "$rootfs/etc/apt/sources.list" << SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
SOURCES
  apt_d=$rootfs/etc/apt/apt.conf.d
  clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb'
  clean+=' /var/cache/apt/*.bin || true'
  cat > "$apt_d/docker-clean" << APT
DPkg::Post-Invoke { "$clean"; };
APT::Update::Post-Invoke { "$clean"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  echo 'Acquire::Languages "none";' > "$apt_d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' > "$apt_d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$apt_d/docker-autoremove-suggests"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | pod import -q --change 'CMD ["bash"]' - debian:12 > /dev/null ||
    fail "podman import of the debootstrap tree failed"
  # -slim: the same tree without documentation, manual pages and translations, and dpkg told to
  # leave them out of packages installed later (as the official debian:12-slim does).
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" << 'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
DPKG
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/groff/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/lintian/* "$rootfs"/usr/share/linda/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | pod import -q --change 'CMD ["bash"]' - debian:12-slim > /dev/null ||
    fail "podman import of the slim tree failed"
  rm -rf "$rootfs"
else
  echo "image_check: [base] reusing debian:12 and debian:12-slim from podman's store" \
    "(--new-base remakes them)"
fi

# --- build --------------------------------------------------------------------------------------
begin build "podman build -f deploy/Dockerfile -t $tag (log: build.log; minutes)"
# The full log goes to build.log; each Dockerfile step is echoed (within 2 s of its start).
build_t=$(date +%s)
seen=0
show_steps() {
  local total
  total=$(wc -l < "$work/build.log")
  ((total > seen)) || return 0
  sed -n "$((seen + 1)),${total}p" "$work/build.log" | grep -E '^(\[[0-9]+/[0-9]+\] )?STEP ' |
    cut -c1-90 | sed "s/^/  $(printf '%5d' $(($(date +%s) - build_t))) s  /" || true
  seen=$total
}
buildah_before="$(pod ps -a --external -q --no-trunc)
$(ls -d /var/tmp/buildah* 2> /dev/null || true)
none"
: > "$work/build.log"
timeout "$build_timeout" "${podcmd[@]}" build --pull=never --network host \
  --ignorefile deploy/Dockerfile.dockerignore -f deploy/Dockerfile -t "$tag" . \
  > "$work/build.log" 2>&1 &
child=$!
while kill -0 "$child" 2> /dev/null; do
  show_steps
  sleep 2
done
rc=0
wait "$child" || rc=$?
child=""
buildah_before=""
show_steps
((rc != 124)) ||
  fail "podman build ran over IMAGE_CHECK_BUILD_TIMEOUT=$build_timeout s" "$work/build.log"
((rc == 0)) || fail "podman build of deploy/Dockerfile failed (exit $rc)" "$work/build.log"

# --- inspect ------------------------------------------------------------------------------------
begin inspect "size, user, no build tools"
size=$(pod image inspect "$tag" --format '{{.Size}}')
size_mb=$((size / 1000000))
echo "image_check: image $tag: $size_mb MB (limit $max_mb MB; single-stage it was 1,220 MB)"
((size_mb < max_mb)) || fail "image $tag is $size_mb MB, not below $max_mb MB"
user=$(pod image inspect "$tag" --format '{{.Config.User}}')
uid=${user%%:*}
gid=${user#*:}
[ "$gid" != "$user" ] || gid=$uid
[[ "$uid" =~ ^[0-9]+$ && "$gid" =~ ^[0-9]+$ ]] ||
  fail "the image's USER is '$user', not a numeric uid:gid (runAsNonRoot needs a number)"
((uid != 0)) || fail "the image runs as root (USER $user)"
echo "image_check: image user $uid:$gid"
check=(run --rm --network none --name "$prefix-inspect" "$tag")
# shellcheck disable=SC2016 # expanded by the container's shell
tools=$(pod "${check[@]}" sh -c \
  'for t in cc c++ gcc g++ clang clang++ cpp cmake make ld as protoc; do command -v $t; done; true') ||
  fail "cannot run a shell in $tag"
[ -z "$tools" ] || fail "the runtime image has build tools: $(echo "$tools" | tr '\n' ' ')"
# shellcheck disable=SC2016 # dpkg-query fields
pod "${check[@]}" dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' > "$work/packages.log" 2>&1 ||
  fail "dpkg-query failed in $tag" "$work/packages.log"
dev=$(awk '$1 == "ii" && $2 ~ /-dev(:|$)/ { print $2 }' "$work/packages.log")
[ -z "$dev" ] || fail "the runtime image has -dev packages: $(echo "$dev" | tr '\n' ' ')"
pod "${check[@]}" sh -c 'command -v openssl loopmoe loopmoe-service loopmoe-coordinator \
  loopmoe-worker loopmoe-expert-shard' > "$work/commands.log" 2>&1 ||
  fail "the image lacks openssl or a loopmoe executable on PATH" "$work/commands.log"
echo "image_check: no compiler, no -dev package; openssl and the five executables on PATH"

# --- prepare ------------------------------------------------------------------------------------
# The volume is the data root: corpus, tokenized data, the cluster's directory (credentials,
# RocksDB, logs) and the job's output. The image's user owns it; the root filesystem stays
# read-only and /tmp is a tmpfs.
vol=$work/vol
mkdir -p "$vol/text"
cat README.md docs/*.md deploy/README.md > "$vol/text/docs.txt"
config=configs/loopmoe_tiny.toml
warmup=$((steps / 4 > 0 ? steps / 4 : 1))
half=$((steps / 2 > 0 ? steps / 2 : 1))
sed -e "s/^steps = .*/steps = $steps/" -e "s/^warmup_steps = .*/warmup_steps = $warmup/" \
  -e "s/^eval_interval = .*/eval_interval = $half/" \
  -e "s/^checkpoint_interval = .*/checkpoint_interval = $half/" \
  -e 's|^dir = .*|dir = "/vol/data"|' "$config" > "$vol/job.toml"
for want in "steps = $steps" "warmup_steps = $warmup" "eval_interval = $half" \
  "checkpoint_interval = $half" 'dir = "/vol/data"'; do
  grep -qx "$want" "$vol/job.toml" ||
    fail "could not set '$want' in a copy of $config (has its layout changed?)"
done
vocab=$(sed -n 's/^vocab_size = \([0-9]*\).*/\1/p' "$vol/job.toml")
[ -n "$vocab" ] || fail "no vocab_size in $config"
cat >> "$vol/job.toml" << TOML

[job]
name = "image-check"
workers = 2
shards = 2
output_dir = "/vol/runs/smoke"
TOML
chown -R "$uid:$gid" "$vol"
chmod 0750 "$vol"
# shellcheck disable=SC2054 # the commas are the tmpfs mount options
run_flags=(--read-only --tmpfs /tmp:rw,nosuid,nodev,size=256m --user "$uid:$gid" --cap-drop ALL
  --security-opt no-new-privileges --network none -v "$vol:/vol" -w /vol)

begin prepare "loopmoe data prepare --vocab $vocab (README.md, docs/*.md, deploy/README.md)"
pod run --rm --name "$prefix-prepare" "${run_flags[@]}" "$tag" loopmoe data prepare \
  --input /vol/text --docs-per-line --vocab "$vocab" --out /vol/data > "$work/prepare.log" 2>&1 ||
  fail "loopmoe data prepare failed in the image" "$work/prepare.log"
tail -n 1 "$work/prepare.log" | sed 's/^/  /'

# --- cluster ------------------------------------------------------------------------------------
# One container runs `cluster up` (coordinator, 2 workers, 2 shards on its loopback: --network
# none); the CLI runs in the same container with `podman exec`, as the same user.
begin cluster "loopmoe cluster up --workers 2 --shards 2 --data-root /vol (TLS + tokens)"
cluster=$prefix-cluster
# cluster_logs: copies the output of cluster up and its processes' logs into $work, names them in
# the array clogs (the coordinator's and cluster up's last, nearest the error line).
clogs=()
cluster_logs() {
  local f
  pod logs "$cluster" > "$work/cluster-up.log" 2>&1 || true
  clogs=()
  for f in "$vol"/cluster/logs/*.log; do
    [ -f "$f" ] || continue
    cp "$f" "$work/cluster-$(basename "$f")"
    [[ "$f" == */coordinator.log ]] || clogs+=("$work/cluster-$(basename "$f")")
  done
  [ -f "$work/cluster-coordinator.log" ] && clogs+=("$work/cluster-coordinator.log")
  clogs+=("$work/cluster-up.log")
}
pod run -d --name "$cluster" "${run_flags[@]}" "$tag" loopmoe cluster up --workers 2 --shards 2 \
  --dir /vol/cluster --data-root /vol > "$work/run.log" 2>&1 ||
  fail "podman run of cluster up failed" "$work/run.log"
deadline=$(($(date +%s) + 120))
until [ -f "$vol/cluster/cluster.env" ]; do
  if [ "$(pod inspect "$cluster" --format '{{.State.Running}}')" != true ]; then
    cluster_logs
    fail "cluster up exited before the cluster was up" "${clogs[@]}"
  fi
  (($(date +%s) < deadline)) || {
    cluster_logs
    fail "cluster up not ready after 120 s" "${clogs[@]}"
  }
  sleep 0.5
done
sed 's/^/  /' < <(pod logs "$cluster" 2>&1)
in_cluster() { pod exec --user "$uid:$gid" -w /vol "$cluster" "$@"; }
# The root filesystem really is read-only for the processes.
# shellcheck disable=SC2016 # the container's $HOME
if in_cluster sh -c 'touch /opt/loopmoe/x || touch /x || touch "$HOME/x"' > /dev/null 2>&1; then
  fail "the root filesystem of the container is writable"
fi

# --- job ----------------------------------------------------------------------------------------
begin job "loopmoe submit --follow ($config, $steps steps, 2 workers + 2 shards)"
timeout "$job_timeout" "${podcmd[@]}" exec --user "$uid:$gid" -w /vol "$cluster" \
  loopmoe submit /vol/job.toml --cluster-dir /vol/cluster --follow > "$work/job.log" 2>&1 &
child=$!
rc=0
wait "$child" || rc=$?
child=""
if ((rc != 0)); then
  cluster_logs
  ((rc != 124)) ||
    fail "the job ran over IMAGE_CHECK_JOB_TIMEOUT=$job_timeout s" "${clogs[@]}" "$work/job.log"
  fail "loopmoe submit --follow failed in the image (exit $rc)" "${clogs[@]}" "$work/job.log"
fi
grep -q "succeeded after $steps steps" "$work/job.log" ||
  fail "the job log has no 'succeeded after $steps steps'" "$work/job.log"
in_cluster loopmoe list --cluster-dir /vol/cluster > "$work/list.log" 2>&1 ||
  fail "loopmoe list failed" "$work/list.log"
grep -q succeeded "$work/list.log" ||
  fail "loopmoe list does not show the job succeeded" "$work/list.log"
out=$vol/runs/smoke
ckpt=$out/checkpoints/$(printf 'step-%08d' "$steps")
[ -s "$out/metrics.jsonl" ] || fail "no metrics.jsonl in the job's output directory" "$work/job.log"
[ -s "$out/config.toml" ] || fail "no config.toml in the job's output directory" "$work/job.log"
grep -Eq "\"step\": *${steps}[,}]" "$out/metrics.jsonl" ||
  fail "metrics.jsonl has no record of step $steps" "$out/metrics.jsonl"
grep -q val_loss "$out/metrics.jsonl" ||
  fail "metrics.jsonl has no validation record" "$out/metrics.jsonl"
[ -n "$(find "$ckpt" -type f -size +0 2> /dev/null)" ] ||
  fail "no checkpoint files in ${ckpt#"$vol"/} (the data root)" "$work/job.log"
grep -E "step +$steps/|succeeded" "$work/job.log" | tail -n 3 | sed 's/^/  /'
echo "image_check: metrics.jsonl ($(wc -l < "$out/metrics.jsonl") records) and checkpoint" \
  "$(basename "$ckpt") ($(du -sh "$ckpt" | cut -f1)) under the data root"

# --- stop ---------------------------------------------------------------------------------------
begin stop "SIGTERM to cluster up"
pod kill --signal TERM "$cluster" > /dev/null
code=$(timeout 60 "${podcmd[@]}" wait "$cluster") || {
  cluster_logs
  fail "cluster up did not exit within 60 s of SIGTERM" "${clogs[@]}"
}
cluster_logs
[ "$code" = 0 ] || fail "cluster up exited $code on SIGTERM (expected 0)" "$work/cluster-up.log"
grep -q "cluster stopped" "$work/cluster-up.log" ||
  fail "cluster up did not report 'cluster stopped'" "$work/cluster-up.log"
pod rm "$cluster" > /dev/null
end_phase
echo "image_check: ok: $tag ($size_mb MB) built; a $steps-step job succeeded in it as uid $uid" \
  "with a read-only root filesystem and no capabilities; cluster up stopped cleanly"
