#!/usr/bin/env bash
# The docker-compose stack, started for real: build the images, start a Ray head, two Ray worker
# nodes and Prometheus, submit a short demo job through Ray's job server, wait for it to succeed,
# read its result.json from the runs volume, check that Prometheus scraped the run's sampa_*
# series, and take everything down again (also on failure). Prints each phase's time.
#
#   ./scripts/demo.sh
#
# Exit codes: 0 the demo ran and every check passed; 1 a step failed (the log's path is printed);
# 3 skipped: no Docker daemon answers and none can be started here (not root, or no dockerd);
# 4 not run: this machine could not be given what the demo needs before it builds anything of
# ours (Docker Compose 2.x, the local base image, the torch wheel), the log says why.
#
# Where Docker Hub cannot be pulled from, the images are built on a local Debian base instead
# (debootstrap, then docker import; kept as sampa-base:bookworm for the next run), Prometheus
# comes from Debian's package (deploy/prometheus/Dockerfile, via deploy/compose.no-hub.yml) and
# Grafana, which has no such stand-in, is left out. Where the PyTorch CPU index cannot be reached,
# the torch wheel is the one this machine's pip finds, served to the build on loopback.
#
# Environment: RAY_AUTH_TOKEN (generated when unset), SAMPA_DEMO_EPOCHS (default 2) and
# SAMPA_DEMO_SYNTHETIC_SIZE (default 1024) size the job, SAMPA_DEMO_TIMEOUT (seconds the job may
# take, default 900), SAMPA_DEMO_LOG (the log file; default in a fresh temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."

SKIPPED=3
PROJECT=sampa-ray-demo            # not the file's own name: a user's stack and its volumes stay
BASE_LOCAL=sampa-base:bookworm
HUB_BASE=python:3.11-slim
HUB_PROMETHEUS=prom/prometheus:v2.53.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
TIMEOUT=${SAMPA_DEMO_TIMEOUT:-900}
export SAMPA_DEMO_EPOCHS=${SAMPA_DEMO_EPOCHS:-2}
export SAMPA_DEMO_SYNTHETIC_SIZE=${SAMPA_DEMO_SYNTHETIC_SIZE:-1024}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sampa-demo.XXXXXX")
LOG=${SAMPA_DEMO_LOG:-$WORK/demo.log}
: > "$LOG"

say() { echo "demo: $*"; }
fail() { say "FAILED: $* (log: $LOG)"; exit 1; }
UNPREPARED=4
unprepared() { say "not run: $* (log: $LOG)"; exit "$UNPREPARED"; }

# -- phase times ------------------------------------------------------------------------------
T_START=$SECONDS
PHASES=()
PHASE=""
PHASE_T0=0
phase() {  # phase NAME: ends the current phase (if any) and starts NAME
  phase_end
  PHASE=$1
  PHASE_T0=$SECONDS
  say "== $PHASE"
}
phase_end() {
  if [ -n "$PHASE" ]; then
    PHASES+=("$(printf '%-28s %5ds' "$PHASE" $((SECONDS - PHASE_T0)))")
    PHASE=""
  fi
}
report_times() {
  phase_end
  echo "demo: times"
  local p
  for p in ${PHASES[@]+"${PHASES[@]}"}; do echo "  $p"; done
  printf '  %-28s %5ds\n' total $((SECONDS - T_START))
}

# -- cleanup: whatever this script started, it stops ------------------------------------------
COMPOSE=()
COMPOSE_FILES=()
STACK_UP=0
HTTP_PID=""
DOCKERD_PID=""
ROOTFS=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$STACK_UP" = 1 ]; then
    phase "down -v"
    if [ "$rc" != 0 ]; then
      "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" logs --no-color --tail 200 >> "$LOG" 2>&1 || true
    fi
    "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" down -v --remove-orphans >> "$LOG" 2>&1 \
      || say "could not take the stack down: docker compose -p $PROJECT down -v"
  fi
  [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null || true
  if [ -n "$ROOTFS" ]; then
    # an interrupted debootstrap may leave proc and sys mounted inside its folder
    grep -o " $ROOTFS/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf --one-file-system "$ROOTFS"
  fi
  if [ -n "$DOCKERD_PID" ]; then
    # the daemon this script started goes too (the images stay in /var/lib/docker)
    kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  # the temporary folder goes unless something failed (then it holds the log)
  if [ "$rc" = 0 ] || [ "$rc" = "$SKIPPED" ]; then rm -rf "$WORK"; fi
  [ "$rc" = "$SKIPPED" ] && exit "$rc"
  report_times
  if [ "$rc" = 0 ]; then say "OK"; else say "log: $LOG"; fi
  exit "$rc"
}
trap cleanup EXIT
# a command that fails unexpectedly (set -e) still says which, in one line, and exits 1 (its
# own status could read as another of the codes above)
trap 'say "FAILED at line $LINENO: $BASH_COMMAND (log: $LOG)"; exit 1' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

is_root() { [ "$(id -u)" = 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }
apt_install() {  # apt_install PKG...: as root, where apt exists; quiet unless it fails
  is_root && have apt-get || return 1
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -q >> "$LOG" 2>&1 || return 1
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >> "$LOG" 2>&1
}
apt_mirror() {  # the Debian mirror this machine's apt uses (deb822 URIs: or one-line deb form)
  local m
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]+/debian/?' | head -1 \
        || true)
  echo "${m:-http://deb.debian.org/debian}"
}
apt_candidate() {  # the version apt would install, or nothing
  have apt-cache || return 0
  apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}'
}

# -- a Docker daemon --------------------------------------------------------------------------
phase "docker daemon"
daemon_answers() { have docker && timeout 20 docker info >/dev/null 2>&1; }
if ! daemon_answers; then
  if ! is_root; then
    say "skipped: no Docker daemon answers, and starting one needs root"
    exit "$SKIPPED"
  fi
  # /usr/local/bin/docker may be a client alone: the daemon comes with Debian's docker.io
  have dockerd || apt_install docker.io || true
  if ! have dockerd; then
    say "skipped: no Docker daemon answers, and none could be installed (no dockerd)"
    exit "$SKIPPED"
  fi
  DOCKERD_LOG=/var/log/sampa-demo-dockerd.log  # outlives the temporary folder
  dockerd > "$DOCKERD_LOG" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do
    daemon_answers && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 1
  done
  if ! daemon_answers; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
    say "skipped: dockerd would not start here (its log: $DOCKERD_LOG)"
    exit "$SKIPPED"
  fi
  say "started dockerd (pid $DOCKERD_PID, log $DOCKERD_LOG)"
fi

# -- Compose v2 (the file uses a top-level name and secrets from the environment, which the
# python docker-compose 1.x refuses) ------------------------------------------------------------
compose_v2() {
  if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); return 0; fi
  if have docker-compose && docker-compose version --short 2>/dev/null | grep -q '^v\?2\.'; then
    COMPOSE=(docker-compose); return 0
  fi
  return 1
}
if ! compose_v2; then
  # Docker's own repository calls it docker-compose-plugin, Ubuntu docker-compose-v2, Debian
  # from trixie on docker-compose (2.x)
  for pkg in docker-compose-plugin docker-compose-v2; do
    [ -n "$(apt_candidate "$pkg")" ] && apt_install "$pkg" && break
  done
  case "$(apt_candidate docker-compose)" in 2.*) apt_install docker-compose || true ;; esac
fi
if ! compose_v2 && is_root && have apt-get && grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
  # Debian 12 packages only the 1.x one: take the plugin binary out of Debian 13's docker-compose
  # package, fetched by apt from the mirror this machine uses, without adding that release to
  # the machine's sources
  mirror=$(apt_mirror)
  d=$WORK/apt-trixie
  mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/x"
  echo "deb ${mirror%/} trixie main" > "$d/sources.list"
  opts=(-o "Dir::Etc::SourceList=$d/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$d/lists" -o "Dir::Cache::Archives=$d/archives"
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
  if apt-get "${opts[@]}" update -q >> "$LOG" 2>&1 \
     && (cd "$d" && apt-get "${opts[@]}" download docker-compose >> "$LOG" 2>&1) \
     && dpkg-deb -x "$d"/docker-compose_*.deb "$d/x"; then
    mkdir -p /usr/local/lib/docker/cli-plugins
    install -m 755 "$d/x/usr/libexec/docker/cli-plugins/docker-compose" \
      /usr/local/lib/docker/cli-plugins/docker-compose
  fi
fi
compose_v2 || unprepared "no Docker Compose 2.x here (docker compose / docker-compose), none installable"
say "compose: ${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null)"

# -- base images: Docker Hub's where it answers, else a local Debian base ---------------------
phase "base images"
COMPOSE_FILES=(-p "$PROJECT" -f docker-compose.yml)
SERVICES=(ray-head ray-worker-1 ray-worker-2 prometheus)
BUILD_ARGS=()
if timeout 120 docker pull -q "$HUB_BASE" >> "$LOG" 2>&1 \
   && timeout 300 docker pull -q "$HUB_PROMETHEUS" >> "$LOG" 2>&1; then
  HUB=1
  SERVICES+=(grafana)
  say "Docker Hub answers: $HUB_BASE, $HUB_PROMETHEUS, and Grafana"
else
  HUB=0
  COMPOSE_FILES+=(-f deploy/compose.no-hub.yml)
  BUILD_ARGS+=(--build-arg "BASE_IMAGE=$BASE_LOCAL")
  say "Docker Hub does not answer: local base $BASE_LOCAL, Prometheus from Debian, Grafana skipped"
  if docker image inspect "$BASE_LOCAL" >/dev/null 2>&1; then
    say "reusing $BASE_LOCAL"
  else
    have debootstrap || apt_install debootstrap || true
    have debootstrap || unprepared "no debootstrap to make the local base image"
    is_root || unprepared "making the local base image needs root (debootstrap)"
    mirror=$(apt_mirror)
    ROOTFS=$WORK/rootfs
    say "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
      bookworm "$ROOTFS" "$mirror" >> "$LOG" 2>&1 || unprepared "debootstrap"
    # trust what this machine trusts beyond Debian's bundle (e.g. a TLS-inspecting proxy's CA):
    # pip inside the builds goes through the same network
    if compgen -G '/usr/local/share/ca-certificates/*.crt' > /dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
      chroot "$ROOTFS" update-ca-certificates >> "$LOG" 2>&1 || unprepared "update-ca-certificates"
    fi
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
    tar -C "$ROOTFS" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' \
      - "$BASE_LOCAL" >> "$LOG" 2>&1 || unprepared "docker import of the local base"
    rm -rf "$ROOTFS"
    ROOTFS=""
  fi
fi

# -- torch: the CPU index, or the wheel this machine's pip finds ------------------------------
if ! timeout 20 curl -fsS -o /dev/null "$TORCH_CPU_INDEX/torch/" 2>> "$LOG"; then
  torch_pin=$(grep -E '^torch==' requirements.lock)           # e.g. torch==2.13.0+cpu
  wheels=${XDG_CACHE_HOME:-$HOME/.cache}/sampa-ray/demo-wheels
  mkdir -p "$wheels"
  pip_py=python3
  [ -x .venv/bin/python ] && pip_py=.venv/bin/python
  # the wheel for the image's Python (3.11, as in both bases) wherever this machine's pip looks
  # (its index, extra indexes, find-links: pip config list)
  "$pip_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
      --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 -d "$wheels" \
      "$torch_pin" >> "$LOG" 2>&1 \
    || unprepared "$TORCH_CPU_INDEX does not answer and pip here finds no $torch_pin"
  # a fixed port while it is free: the URL is a build argument of the torch layer, so a port
  # that changes would rebuild that layer every time
  port=$(python3 -c '
import socket
for port in (38765, 0):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            print(s.getsockname()[1])
            break
    except OSError:
        pass')
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$wheels" >> "$LOG" 2>&1 &
  HTTP_PID=$!
  index=$("$pip_py" -m pip config get global.index-url 2>/dev/null || true)
  index=${PIP_INDEX_URL:-${index:-https://pypi.org/simple}}
  BUILD_ARGS+=(--build-arg "TORCH_SPEC=$torch_pin" --build-arg "TORCH_INDEX_URL=$index"
               --build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$port/")
  say "$TORCH_CPU_INDEX does not answer: $torch_pin from this machine's pip, the rest from $index"
fi

# -- images -----------------------------------------------------------------------------------
phase "build images"
# --network host: pip inside the build reaches the package index as this machine does (and the
# loopback wheel server above)
docker build --network host -t sampa-ray:local ${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"} . >> "$LOG" 2>&1 \
  || fail "docker build of sampa-ray:local"
if [ "$HUB" = 0 ]; then
  docker build --network host --build-arg "BASE_IMAGE=$BASE_LOCAL" -t sampa-prometheus:local \
    deploy/prometheus >> "$LOG" 2>&1 || fail "docker build of sampa-prometheus:local"
fi
[ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null && HTTP_PID=""
say "built sampa-ray:local$([ "$HUB" = 0 ] && echo ', sampa-prometheus:local')"

# -- the stack --------------------------------------------------------------------------------
phase "cluster up"
COMPOSE_FILES+=(-f deploy/compose.demo.yml)
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  RAY_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
fi
export RAY_AUTH_TOKEN
dc() { "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" "$@"; }
head_py() { dc exec -T ray-head python3 - "$@"; }  # a Python script on stdin, in the head
STACK_UP=1
dc down -v --remove-orphans >> "$LOG" 2>&1 || true  # what an interrupted run left
dc up -d --no-build --wait --wait-timeout 300 "${SERVICES[@]}" >> "$LOG" 2>&1 \
  || fail "docker compose up ${SERVICES[*]}"
# the two worker nodes joined (2 CPUs each, the head has none)
cpus=0
for _ in $(seq 60); do
  cpus=$(head_py <<'EOF' 2>> "$LOG" || true
import ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
print(int(ray.cluster_resources().get("CPU", 0)))
EOF
)
  [ "${cpus:-0}" -ge 4 ] 2>/dev/null && break
  sleep 2
done
[ "${cpus:-0}" -ge 4 ] 2>/dev/null || fail "the worker nodes did not join the head (CPUs: ${cpus:-?})"
say "Ray cluster: head + 2 worker nodes ($cpus CPUs), Prometheus up"
[ "$HUB" = 0 ] && say "Grafana skipped: its image comes only from Docker Hub"

# -- the job ----------------------------------------------------------------------------------
phase "job (ray job submit)"
say "job: $SAMPA_DEMO_EPOCHS epochs of $SAMPA_DEMO_SYNTHETIC_SIZE synthetic samples, timeout ${TIMEOUT}s"
dc up -d --no-build submit >> "$LOG" 2>&1 || fail "docker compose up submit"
status=""
deadline=$((SECONDS + TIMEOUT))
while [ "$SECONDS" -lt "$deadline" ]; do
  # the newest submission's status, through the job server's API
  status=$(head_py <<'EOF' 2>> "$LOG" || true
from ray.job_submission import JobSubmissionClient
jobs = JobSubmissionClient("http://127.0.0.1:8265").list_jobs()
jobs = [j for j in jobs if j.submission_id]
print(max(jobs, key=lambda j: j.start_time or 0).status.value if jobs else "NONE")
EOF
)
  case "$status" in
    SUCCEEDED) break ;;
    FAILED | STOPPED)
      dc logs --no-color submit 2>&1 | tail -n 30 | sed 's/^/  /'
      fail "the job ended $status" ;;
  esac
  sleep 5
done
[ "$status" = SUCCEEDED ] || fail "the job did not succeed within ${TIMEOUT}s (status: ${status:-?})"
say "job SUCCEEDED"

# -- what it left: result.json on the runs volume, and the series Prometheus scraped ----------
phase "check result + Prometheus"
result=$(dc exec -T ray-head cat /runs/demo/result.json) || fail "no /runs/demo/result.json"
# the run's id as its metrics label it: ALGO-HASH8-STARTED (the start time is not in result.json)
summary=$(python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print(r["config"]["algo"] + "-" + r["config_hash"][:8] + "-", r["steps"], r["final_test_accuracy"])
' <<< "$result") || fail "result.json does not hold a finished run"
read -r run_prefix steps acc <<< "$summary"
say "result.json: $steps steps, final test accuracy $acc"
# the series API, over the last hour: the coordinator's endpoint went with the job, so an
# instant query would find its series stale by now
found=$(head_py "$run_prefix" <<'EOF' 2>> "$LOG"
import json, sys, time, urllib.parse, urllib.request

def api(path, **params):
    url = f"http://prometheus:9090/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]

run_prefix = sys.argv[1]
now = time.time()
labels = 'job="sampa",component="coordinator",instance="ray-head:9400"'
runs = api("series", **{"match[]": f'sampa_run_info{{{labels},run_id=~"{run_prefix}.+"}}'},
           start=now - 3600, end=now)
series = api("series", **{"match[]": f'{{__name__=~"sampa_.+",{labels}}}'},
             start=now - 3600, end=now)
steps = api("query", query=f"max(max_over_time(sampa_steps_total{{{labels}}}[1h]))")["result"]
if not runs or not series or not steps or float(steps[0]["value"][1]) <= 0:
    sys.exit(f"run {run_prefix}*: run_info {runs}, {len(series)} sampa_ series, steps {steps}")
names = {s["__name__"] for s in series}
print(runs[0]["run_id"], len(names), len(series), int(float(steps[0]["value"][1])))
EOF
) || fail "Prometheus holds no sampa_* series of the run"
read -r run_id n_names n_series prom_steps <<< "$found"
say "Prometheus: run $run_id, $n_names sampa_* metrics in $n_series series from ray-head:9400" \
    "(steps seen: $prom_steps of $steps)"
exit 0
