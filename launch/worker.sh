#!/usr/bin/env bash
# Runs ON a worker (installed into ~/modjax/src/launch by launch/install.sh; the laptop-side
# scripts call it over ssh): starts a command detached with its log, streams that log, stops it.
set -euo pipefail

HELP="usage: bash modjax/src/launch/worker.sh start RUN UPLOAD -- COMMAND [ARGS...]
       bash modjax/src/launch/worker.sh logs RUN
       bash modjax/src/launch/worker.sh stop RUN

start: runs COMMAND in ~/modjax/src with ~/modjax/.venv active, in its own session (it outlives
       the ssh connection), output to ~/modjax/logs/RUN.log, exit status to RUN.rc; UPLOAD
       (a gs:// prefix, or '') receives the log as UPLOAD/logs/RUN.workerI.log every 5 minutes
       and at the end. A run of that name still alive here is refused.
logs:  prints RUN.log, prefixed with this worker's index, following it while the run lives;
       exits with the run's status.
stop:  SIGTERM to the run's process group."

ROOT=$HOME/modjax
LOGS=$ROOT/logs
UPLOAD_EVERY_S=300

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

worker_id() { # the TPU worker index from the VM metadata; 0 on a single VM
  curl -sf --max-time 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
    echo 0
}

booted_at() { # seconds since the epoch when this machine booted
  local up
  read -r up _ </proc/uptime
  echo $(($(date +%s) - ${up%.*}))
}

# A run is alive while the process of its pid file is; a pid file from before the last boot (a
# restarted VM) names some other process by now.
alive() {
  [[ -f $LOGS/$1.pid ]] && (($(stat -c %Y "$LOGS/$1.pid") >= $(booted_at) - 2)) &&
    kill -0 "$(cat "$LOGS/$1.pid")" 2>/dev/null
}

start() {
  local run=$1 upload=$2
  shift 2
  [[ ${1:-} == -- ]] && shift
  (($#)) || die "no command to start"
  mkdir -p "$LOGS"
  ! alive "$run" || die "run $run is still running on worker $(worker_id) (pid $(cat "$LOGS/$run.pid")); stop it with launch/stop.sh or pick another --run"
  rm -f "$LOGS/$run.rc"
  setsid nohup bash "$(readlink -f "$0")" _exec "$run" "$upload" "$@" >"$LOGS/$run.log" 2>&1 </dev/null &
  echo $! >"$LOGS/$run.pid"
  echo "worker $(worker_id): started $run (pid $!): $*"
}

upload_log() { # LOG DEST
  if command -v gcloud >/dev/null; then
    gcloud storage cp --quiet "$1" "$2" >/dev/null 2>&1 || echo "(could not copy the log to $2)" >&2
  fi
}

_exec() {
  local run=$1 upload=$2 id dest="" uploader="" rc
  shift 2
  id=$(worker_id)
  cd "$ROOT/src"
  set +u # activate scripts need not be nounset-safe
  # shellcheck source=/dev/null
  source "$ROOT/.venv/bin/activate"
  set -u
  export PYTHONUNBUFFERED=1 # the log shows progress as it happens
  if [[ -n $upload ]]; then
    dest=${upload%/}/logs/$run.worker$id.log
    (while sleep "$UPLOAD_EVERY_S"; do upload_log "$LOGS/$run.log" "$dest"; done) &
    uploader=$!
  fi
  echo "[$(date -u +%FT%TZ)] worker $id, $(hostname): $*"
  set +e
  "$@"
  rc=$?
  set -e
  echo "[$(date -u +%FT%TZ)] worker $id: exit status $rc"
  echo "$rc" >"$LOGS/$run.rc"
  if [[ -n $dest ]]; then
    kill "$uploader" 2>/dev/null || true
    upload_log "$LOGS/$run.log" "$dest"
  fi
  exit "$rc"
}

logs() {
  local run=$1 log=$LOGS/$1.log id pid=""
  id=$(worker_id)
  if [[ ! -f $log ]]; then
    local runs=("$LOGS"/*.log)
    runs=("${runs[@]##*/}")
    die "no run $run on worker $id (runs here: ${runs[*]%.log})"
  fi
  ! alive "$run" || pid=$(cat "$LOGS/$run.pid")
  if [[ -n $pid ]]; then
    tail -n +1 --pid="$pid" -F "$log" 2>/dev/null | sed -u "s/^/[$id] /"
  else
    sed "s/^/[$id] /" "$log"
  fi
  [[ -f $LOGS/$run.rc ]] || die "run $run on worker $id ended without an exit status (stopped or killed)"
  exit "$(cat "$LOGS/$run.rc")"
}

stop() {
  local run=$1
  alive "$run" || die "run $run is not running on worker $(worker_id)"
  kill -TERM -- "-$(cat "$LOGS/$run.pid")"
  echo "worker $(worker_id): stopped $run"
}

case ${1:-} in
  start) (($# >= 3)) || die "start needs RUN UPLOAD -- COMMAND"; shift; start "$@" ;;
  _exec) shift; _exec "$@" ;;
  logs | stop) (($# == 2)) || die "$1 needs RUN"; "$1" "$2" ;;
  -h | --help) printf '%s\n' "$HELP" ;;
  *) die "unknown action '${1:-}'; use start, logs or stop (see --help)" ;;
esac
