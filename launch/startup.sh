#!/usr/bin/env bash
# The workers' startup script. launch/create.sh --unattended (and launch/supervise.sh) put this
# file into the metadata of every TPU VM of the slice, or of the GPU VM, which runs it as root
# at every boot: it installs modjax with launch/install.sh and starts, or resumes, the run
# recorded in the bucket unless that run has ended, copying the logs to the bucket. It must be
# self-contained: at boot nothing else of modjax is on the VM yet.
set -euo pipefail

META_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes
TRIES=3          # starts of the run per boot
RETRY_PAUSE_S=60 # between them
READ_TRIES=5     # reads of run.args at boot (the network may still be coming up)
READ_PAUSE_S=${MODJAX_LAUNCH_POLL_S:-15}
DRY_RUN=0

HELP="usage: launch/startup.sh [--dry-run]         (as root: what the VM runs at boot)
       bash modjax/startup.sh boot [--dry-run]   (as the run's user: the rest, started by the first)

As root: reads the run's workdir from this VM's metadata (modjax-workdir) and the run's record
WORKDIR/launch/run.args (written by launch/create.sh --unattended), creates the run's user if
it is missing and starts the rest as that user, detached, logging to ~/modjax/logs/boot.log:

 1. WORKDIR/launch/status exists: the run has ended ('finished', or 'failed' for good); stop.
 2. fetch launch/ (git --repo at --ref, or WORKDIR/launch/src with a --wheel) into
    ~/modjax/staged, then launch/install.sh --local with the recorded options.
 3. start python -m modjax.train with the recorded arguments through launch/worker.sh; every
    worker of a slice does, and jax.distributed.initialize() joins them. It resumes from the
    latest checkpoint in the workdir. Its log is copied to WORKDIR/logs/RUN.workerI.log every
    5 minutes and at the end; the boot log to WORKDIR/logs/RUN.boot.workerI.log after the
    install, at each start and at exit.
 4. when it ends, worker 0 records it in WORKDIR/launch/status: exit status 0 as 'finished',
    2 (bad input) or 3 (non-finite loss) as 'failed', since starting again would end the same
    way. Any other exit (a host that came up late, a lost connection) is started again, up to
    $TRIES times in this boot; a run stopped by launch/stop.sh is left stopped until the next boot.

  --dry-run   print the commands that would change anything (the user, downloads, install,
              start, log copies, status) and run none; the reads it decides by (metadata,
              run.args, status) still happen
  --help      this text"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

note() {
  if ((DRY_RUN)); then printf '# %s\n' "$*"; else printf '[%s] %s\n' "$(date -u +%FT%TZ)" "$*"; fi
}

quote_words() { # the words, shell-quoted where needed (as launch/common.sh prints them)
  local out="" w
  for w in "$@"; do
    [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]] || w="'${w//\'/\'\\\'\'}'"
    out+="${out:+ }$w"
  done
  printf '%s' "$out"
}

run() { # prints the command (dry run), or traces and runs it
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")"
    "$@"
  fi
}

metadata() { curl -sf --max-time 5 -H 'Metadata-Flavor: Google' "$META_URL/$1"; }

# Reads WORKDIR (metadata) and WORKDIR/launch/run.args into RUN_USER, RUN, INSTALL and TRAIN.
read_run() {
  local text="" try line key
  WORKDIR=$(metadata modjax-workdir) ||
    die "no modjax-workdir in this VM's metadata; create it with launch/create.sh --unattended"
  for ((try = 1; try <= READ_TRIES; try++)); do
    text=$(gcloud storage cat "$WORKDIR/launch/run.args") && break
    ((try == READ_TRIES)) && break
    note "could not read $WORKDIR/launch/run.args (try $try); again in ${READ_PAUSE_S}s"
    sleep "$READ_PAUSE_S"
  done
  [[ -n $text ]] ||
    die "cannot read $WORKDIR/launch/run.args; write it with launch/create.sh --unattended and give the VMs' service account read access to the bucket"
  RUN_USER="" RUN="" INSTALL=() TRAIN=()
  while IFS= read -r line; do
    key=${line%% *}
    case $key in
      '' | '#'*) ;;
      user) RUN_USER=${line#user } ;;
      run) RUN=${line#run } ;;
      install) INSTALL+=("${line#install }") ;;
      train) TRAIN+=("${line#train }") ;;
      *) die "unknown line '$line' in $WORKDIR/launch/run.args; rewrite it with launch/create.sh --unattended" ;;
    esac
  done <<<"$text"
  [[ $RUN_USER =~ ^[a-z_][a-z0-9_-]{0,31}$ && $RUN =~ ^[A-Za-z0-9][-A-Za-z0-9_.]*$ ]] ||
    die "bad user or run in $WORKDIR/launch/run.args; rewrite it with launch/create.sh --unattended"
}

# As root, at boot: the user, this script in its home, the rest started as that user.
as_root() {
  ((DRY_RUN || EUID == 0)) || die "run it as root (the VM does at boot); --dry-run shows what it does"
  read_run
  local home
  if ! home=$(getent passwd "$RUN_USER" | cut -d: -f6) || [[ -z $home ]]; then
    run useradd --create-home --shell /bin/bash "$RUN_USER"
    home=/home/$RUN_USER
  fi
  run install -d -o "$RUN_USER" "$home/modjax" "$home/modjax/logs"
  run install -o "$RUN_USER" -m 0755 "$0" "$home/modjax/startup.sh"
  local rest="bash modjax/startup.sh boot >>modjax/logs/boot.log 2>&1"
  if ((DRY_RUN)); then
    run setsid nohup runuser -l "$RUN_USER" -c "$rest"
    note "as $RUN_USER, in $home, output to modjax/logs/boot.log:"
    boot
  else
    setsid nohup runuser -l "$RUN_USER" -c "$rest" </dev/null >/dev/null 2>&1 &
    note "run $RUN: started the rest as $RUN_USER; its log: $home/modjax/logs/boot.log"
  fi
}

copy_boot_log() {
  run gcloud storage cp --quiet modjax/logs/boot.log "$WORKDIR/logs/$RUN.boot.worker$WORKER.log" ||
    note "could not copy the boot log to $WORKDIR/logs/"
}

read_status() { gcloud storage cat "$WORKDIR/launch/status" 2>/dev/null || true; }

# True (and says why) when the run has ended for good.
ended() {
  local status
  if ((DRY_RUN)); then printf '# reads %s\n' "$WORKDIR/launch/status"; fi
  status=$(read_status)
  case $status in
    '')
      note "no status: run $RUN has not ended; installing, then starting it (it resumes from the latest checkpoint in $WORKDIR)"
      return 1 ;;
    finished* | failed*)
      note "run $RUN has ended ($WORKDIR/launch/status: ${status%%$'\n'*}); not starting it again (to train on: gcloud storage rm $WORKDIR/launch/status, then reboot the workers)" ;;
    *) die "unexpected $WORKDIR/launch/status '${status%%$'\n'*}'; it says 'finished ...' or 'failed ...'" ;;
  esac
}

# launch/ (with install.sh) into modjax/staged: from git, or the files create.sh staged.
fetch_launch() {
  local i repo="" ref=main wheel=""
  for ((i = 0; i < ${#INSTALL[@]}; i++)); do
    case ${INSTALL[i]} in
      --repo) repo=${INSTALL[i + 1]} ;;
      --ref) ref=${INSTALL[i + 1]} ;;
      --wheel) wheel=${INSTALL[i + 1]} ;;
    esac
  done
  run mkdir -p modjax/staged
  if [[ -n $wheel ]]; then
    run gcloud storage rsync -r --delete-unmatched-destination-objects "$WORKDIR/launch/src" modjax/staged
  else
    [[ -n $repo ]] || die "no --repo or --wheel in $WORKDIR/launch/run.args; rewrite it with launch/create.sh --unattended"
    run git init -q modjax/staged
    run git -C modjax/staged fetch -q --depth=1 "$repo" "$ref"
    run git -C modjax/staged checkout -q -f --detach FETCH_HEAD
  fi
}

record() { # WORD DETAIL: worker 0 writes WORKDIR/launch/status
  local url=$WORKDIR/launch/status line
  line="$1 $(date -u +%FT%TZ): $2"
  if ((WORKER != 0)); then
    note "$1 ($2); worker 0 records it"
  elif ((DRY_RUN)); then
    printf "printf '%%s\\\\n' %s | %s\n" "$(quote_words "$line")" "$(quote_words gcloud storage cp - "$url")"
  else
    printf '%s\n' "$line" | gcloud storage cp - "$url" || note "could not write $url"
  fi
}

# Starts the run (again, after a failure that may pass) and records how it ended.
train_until_ended() {
  local try rc
  for ((try = 1; try <= TRIES; try++)); do
    run bash modjax/src/launch/worker.sh start "$RUN" "$WORKDIR" -- python -m modjax.train "${TRAIN[@]}"
    copy_boot_log
    if ((DRY_RUN)); then
      note "worker.sh copies the run's log to $WORKDIR/logs/$RUN.worker$WORKER.log every 5 minutes and at its end"
      note "waits for the run's end:"
      run bash modjax/src/launch/worker.sh logs "$RUN"
      note "exit status 0 is recorded (by worker 0) with:"
      record finished "exit status 0"
      note "2 or 3 with 'failed ...'; any other starts it again (at most $TRIES times in this boot)"
      return 0
    fi
    bash modjax/src/launch/worker.sh logs "$RUN" >/dev/null 2>&1 || true # waits for the end
    rc=$(cat "modjax/logs/$RUN.rc" 2>/dev/null || echo none)
    case $rc in
      0) record finished "exit status 0"; return 0 ;;
      2 | 3) record failed "exit status $rc (see $WORKDIR/logs/$RUN.worker$WORKER.log)"; return 0 ;;
      none) note "run $RUN was stopped (no exit status); not starting it again in this boot"; return 0 ;;
    esac
    note "run $RUN exited with status $rc (start $try of $TRIES)"
    [[ -z $(read_status) ]] || { note "another worker recorded its end"; return 0; }
    ((try == TRIES)) || sleep "$RETRY_PAUSE_S"
  done
  note "giving up in this boot; the next boot starts it again"
  exit 1
}

# As the run's user, in its home: install, train, record.
boot() {
  ((DRY_RUN)) || cd "$HOME"
  [[ -n ${RUN:-} ]] || read_run
  WORKER=$(metadata agent-worker-number || true) # none on a GPU VM
  [[ $WORKER =~ ^[0-9]+$ ]] || WORKER=0
  note "worker $WORKER, $(hostname): run $RUN, workdir $WORKDIR"
  trap copy_boot_log EXIT
  ended && return 0
  fetch_launch
  run bash modjax/staged/launch/install.sh --local "${INSTALL[@]}"
  train_until_ended
}

ACTION=as_root
for arg in "$@"; do
  case $arg in
    boot) ACTION=boot ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) printf '%s\n' "$HELP"; exit 0 ;;
    *) die "unknown argument '$arg'; use [boot] [--dry-run] (see --help)" ;;
  esac
done
((DRY_RUN == 0)) || note "dry run: what this worker would do at boot; only the reads happen"
"$ACTION"
