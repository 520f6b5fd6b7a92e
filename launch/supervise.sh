#!/usr/bin/env bash
# Keeps an unattended run (launch/create.sh --unattended) going where a preempted machine does
# not come back by itself: recreates the queued resource (or starts the stopped GPU VM) with the
# same startup script, until the run's status in the bucket says it has ended.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=launch/common_unattended.sh
source "$LAUNCH_DIR/common_unattended.sh"

HELP="usage: launch/supervise.sh --name NAME --zone ZONE (--accelerator TYPE | --machine-type TYPE)
         (--bucket gs://B [--run RUN] | --workdir gs://P) [--once] [--delete-when-done] [options]

Give it the create options of launch/create.sh --unattended (the run itself is recorded in
WORKDIR/launch/run.args). Every --interval seconds it reads WORKDIR/launch/status and the
queued resource's state:
  the status says 'finished' or 'failed'     stop (exit 0 or 1); with --delete-when-done the
                                             queued resource (or GPU VM) is deleted first
  ACTIVE, WAITING_FOR_RESOURCES, PROVISIONING, CREATING, ACCEPTED, SUSPENDING, DELETING
                                             nothing to do (the workers train, or it is on its way)
  SUSPENDED or FAILED (a spot preemption)    delete it and create it again, with the startup
                                             script, which installs and resumes the run
  not found                                  create it (as above)
A GPU VM (--machine-type) that is TERMINATED (a spot VM is stopped on preemption) is started
again; one not found is created. It runs wherever gcloud can manage the project and read the
bucket: a small always-on VM, Cloud Shell, or a scheduled job with --once (launch/README.md).
Stop it before deleting the slice by hand, or it creates the slice again.

  --interval S          seconds between checks (default ${OPT[interval]})
  --once                check once and exit (for cron or a scheduled job): 0 while the run goes
                        on or has finished, 1 if it failed
  --delete-when-done    delete the queued resource (or GPU VM) once the run has ended: billing
                        stops (its checkpoints and logs are in the bucket)
  --project ID          Google Cloud project (default: gcloud's configured one)
  --dry-run             print the gcloud commands of one check, recreation included
  --help                this text
  Other options: see launch/create.sh --help.

Example: launch/supervise.sh --name modjax-v4-32 --zone us-central2-b --accelerator v4-32 --spot \\
           --bucket gs://my-bucket --delete-when-done"

parse_args "name zone project accelerator runtime-version spot reserved service-account
  machine-type image-family image-project disk-size bucket workdir run interval once
  delete-when-done dry-run" "$@"
((${#CMD[@]} == 0)) || die "$PROG takes no command after --; the run is recorded in the bucket"
validate_target
validate_create
validate_workdir
[[ ${OPT[interval]} =~ ^[0-9]+$ ]] || die "bad --interval '${OPT[interval]}'; use seconds"
validate_unattended
dry_run_header

# The run's record must exist: a slice created without it would boot into an error.
if dry_run; then
  run gcloud storage ls "${OPT[workdir]}/launch/run.args"
else
  gcloud storage ls "${OPT[workdir]}/launch/run.args" >/dev/null 2>&1 ||
    die "no unattended run recorded in ${OPT[workdir]}/launch/run.args; start it with launch/create.sh --unattended"
fi

# Deletes the machine once the run has ended (--delete-when-done) and exits; returns otherwise.
stop_if_ended() {
  local status=""
  if dry_run; then
    run_status
    if [[ ${OPT[delete-when-done]} == 1 ]]; then
      note "once the status says the run has ended: delete, then stop"
      delete_resources
    else
      note "once the status says the run has ended: stop"
    fi
    return 0
  fi
  status=$(run_status)
  [[ -n $status ]] || return 0
  note "run ${OPT[run]} has ended: ${status%%$'\n'*}"
  if [[ ${OPT[delete-when-done]} == 1 ]]; then
    delete_resources || note "could not delete ${OPT[name]}; delete it with launch/delete.sh"
  fi
  [[ $status == finished* ]] || exit 1
  exit 0
}

check_tpu() {
  local state=NOT_FOUND
  if dry_run; then
    qr_describe
    note "when SUSPENDED or FAILED (deleted first) or not found:"
  else
    state=$(qr_describe)
  fi
  case $state in
    ACTIVE | WAITING_FOR_RESOURCES | PROVISIONING | CREATING | ACCEPTED | SUSPENDING | DELETING)
      note "queued resource ${OPT[name]}: $state" ;;
    *)
      dry_run || note "queued resource ${OPT[name]}: $state; creating it again"
      if dry_run || [[ $state != NOT_FOUND ]]; then
        delete_resources || { note "could not delete it; trying again next time"; return 0; }
      fi
      create_tpu || note "could not create it; trying again next time" ;;
  esac
}

check_gpu() {
  local state=NOT_FOUND
  if dry_run; then
    run gcloud compute instances describe "${OPT[name]}" "--zone=${OPT[zone]}" \
      "--format=value(status)" "${PROJECT_ARGS[@]}"
    note "when TERMINATED:"
    state=TERMINATED
  else
    state=$(vm_state)
  fi
  case $state in
    TERMINATED | STOPPED)
      run gcloud compute instances start "${OPT[name]}" "--zone=${OPT[zone]}" "${PROJECT_ARGS[@]}" ||
        note "could not start it; trying again next time" ;;
    NOT_FOUND) create_gpu || note "could not create it; trying again next time" ;;
    *) note "VM ${OPT[name]}: $state" ;;
  esac
  ! dry_run || { note "when not found:" && create_gpu; }
}

while :; do
  stop_if_ended
  if gpu; then check_gpu; else check_tpu; fi
  if dry_run; then
    if [[ ${OPT[once]} == 1 ]]; then note "then exits (--once)"; else
      note "then again every ${OPT[interval]}s, until the run has ended"
    fi
    break
  fi
  [[ ${OPT[once]} != 1 ]] || break
  sleep "${OPT[interval]}"
done
