# shellcheck shell=bash
# Sourced after common.sh by create.sh and supervise.sh: an unattended run, one the workers
# install and start (or resume) by themselves at every boot through launch/startup.sh, with its
# record in the run's gs:// workdir:
#
#   WORKDIR/launch/run.args  what startup.sh runs, one "KEY WORD" line per word: the worker's
#                            user, the run's name, install.sh's options, modjax.train's arguments
#   WORKDIR/launch/src/      with --wheel: the wheel, configs/ and launch/ the workers install from
#   WORKDIR/launch/status    written by worker 0 when the run has ended for good:
#                            "finished ..." or "failed ..."; a run with a status is not started again
#   WORKDIR/logs/            each worker's run log (RUN.workerI.log) and boot log (RUN.boot.workerI.log)
#
# The VMs' metadata holds the startup script and modjax-workdir=WORKDIR, nothing else: the
# supervisor recreates a slice from that alone.

# (OPT, FLAG_OPTS, STARTUP_META and the functions used here are common.sh's.)
for _key in worker-user interval unattended once delete-when-done; do OPT["$_key"]=""; done
OPT["interval"]=300
FLAG_OPTS+="unattended once delete-when-done "

validate_worker_user() {
  [[ -n ${OPT[worker-user]} ]] || OPT[worker-user]=${USER:-$(id -un)}
  [[ ${OPT[worker-user]} =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
    die "bad --worker-user '${OPT[worker-user]}'; pass the Linux user 'gcloud compute ssh' logs in as (lowercase letters, digits, '_', '-')"
}

# The workdir (validate_workdir) goes into the VMs' metadata, the arguments into run.args.
validate_unattended() {
  [[ ${OPT[workdir]} != *[,=]* ]] ||
    die "bad --workdir '${OPT[workdir]}'; the VMs' metadata cannot hold ',' or '=': pick a path without them"
  local word
  for word in "${CMD[@]}"; do
    [[ $word != *$'\n'* ]] || die "an argument after -- holds a line break; pass each flag on one line"
  done
  # shellcheck disable=SC2034  # read by create_tpu/create_gpu
  STARTUP_META=modjax-workdir=${OPT[workdir]}
}

status_url() { printf '%s/launch/status' "${OPT[workdir]}"; }

# The run's status in the bucket ('' while it has not ended); a dry run prints the read.
run_status() {
  if dry_run; then
    run gcloud storage cat "$(status_url)"
  else
    gcloud storage cat "$(status_url)" 2>/dev/null || true
  fi
}

# upload_text URL LINE...: the lines as one object (gcloud storage cp reads stdin for '-').
upload_text() {
  local url=$1
  shift
  if dry_run; then
    printf "printf '%%s\\\\n' %s | %s\n" "$(quote_words "$@")" "$(quote_words gcloud storage cp - "$url")"
  else
    printf '+ gcloud storage cp - %s\n' "$url" >&2
    printf '%s\n' "$@" | gcloud storage cp - "$url"
  fi
}

# Writes WORKDIR/launch/run.args (and, with --wheel, stages WORKDIR/launch/src/) for the workers.
# CMD is the training command (train_command). A run that has ended for good is refused: its
# workers would not start it.
record_unattended_run() {
  local status="" install=() lines=() word src=${OPT[workdir]}/launch/src
  note "an ended run is refused; what the workers will run goes to ${OPT[workdir]}/launch/"
  if dry_run; then run_status; else status=$(run_status); fi
  [[ -z $status ]] ||
    die "run ${OPT[run]} has ended ($(status_url): ${status%%$'\n'*}); pick another --run, or remove the status to train on: gcloud storage rm $(status_url)"
  if [[ -n ${OPT[wheel]} ]]; then
    run gcloud storage cp "${OPT[wheel]}" "$src/$(basename "${OPT[wheel]}")"
    run gcloud storage rsync -r --delete-unmatched-destination-objects "$REPO_DIR/configs" "$src/configs"
    run gcloud storage rsync -r --delete-unmatched-destination-objects "$REPO_DIR/launch" "$src/launch"
    install=(--wheel "modjax/staged/$(basename "${OPT[wheel]}")")
  else
    install=(--repo "${OPT[repo]}" --ref "${OPT[ref]}")
  fi
  install+=(--python "${OPT[python]}")
  ! gpu || install+=(--gpu)
  lines=("# modjax unattended run: written by launch/create.sh, read by launch/startup.sh at boot"
    "user ${OPT[worker-user]}" "run ${OPT[run]}")
  for word in "${install[@]}"; do lines+=("install $word"); done
  for word in "${CMD[@]:3}"; do lines+=("train $word"); done # after python -m modjax.train
  upload_text "${OPT[workdir]}/launch/run.args" "${lines[@]}"
}
