#!/usr/bin/env bash
# After a preemption: recreate the slice (or restart the GPU VM), reinstall, train again; the
# run resumes from the latest checkpoint in its gs:// workdir.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELP="usage: launch/resume.sh --name NAME --zone ZONE --accelerator TYPE --config FILE[:ARG]
         (--bucket gs://B | --workdir gs://P) (--repo URL [--ref REF] | --wheel FILE) [options]
         [-- --config.KEY=VALUE ...]

Give it the options create.sh, install.sh and train.sh were given. If the queued resource is
ACTIVE, the run is started again on it as it is (a run still alive there is refused, not
duplicated). Otherwise (spot preemption leaves it SUSPENDED or FAILED; or --recreate) the
queued resource is deleted with its VMs, created again, waited for, modjax is installed and
the run started. modjax.train finds the latest checkpoint in the workdir and continues from it
(steps, optimizer state and data position); only the steps after that checkpoint are redone.
With --gpu the stopped spot VM is started again (its disk and install survive).

  --recreate    delete and recreate even when the queued resource is ACTIVE
  --gpu         NAME is a GPU VM made by launch/create.sh --machine-type (then --accelerator,
                --repo/--wheel are not needed)
  --dry-run     print the gcloud commands instead of running them (all of them: the
                recreate path is shown whatever the state)
  --help        this text
  Other options: see launch/create.sh, install.sh and train.sh --help.

Example: launch/resume.sh --name modjax-v4-32 --zone us-central2-b --accelerator v4-32 --spot \\
           --repo https://github.com/ORG/modjax.git --ref v0.1.0 \\
           --config configs/t5_finetune.py:xsum,t5-large --bucket gs://my-bucket -- --config.mesh.fsdp=16"

parse_args "name zone project accelerator runtime-version spot reserved service-account
  wait-timeout repo ref wheel python config bucket workdir run follow-worker detach recreate
  gpu dry-run" "$@"
validate_target
gpu || validate_create
gpu || validate_install
validate_config
validate_run_name
validate_workdir
train_command
dry_run_header

if gpu; then
  state=TERMINATED
  if dry_run; then
    run gcloud compute instances describe "${OPT[name]}" "--zone=${OPT[zone]}" \
      "--format=value(status)" "${PROJECT_ARGS[@]}"
    note "if the VM is not RUNNING:"
  else
    state=$(vm_state)
    [[ $state != NOT_FOUND ]] || die "no VM ${OPT[name]} in ${OPT[zone]}; create it with launch/create.sh --machine-type"
  fi
  [[ $state == RUNNING ]] || run gcloud compute instances start "${OPT[name]}" "--zone=${OPT[zone]}" "${PROJECT_ARGS[@]}"
else
  state=NOT_FOUND
  if dry_run; then
    qr_describe
    note "unless ACTIVE (or with --recreate), the queued resource is recreated:"
  else
    state=$(qr_describe)
    note "queued resource ${OPT[name]}: $state"
  fi
  if [[ $state != ACTIVE || ${OPT[recreate]} == 1 ]]; then
    if dry_run || [[ $state != NOT_FOUND ]]; then delete_resources; fi
    create_tpu
    wait_tpu
    install_workers
  fi
fi
start_run
follow_run
