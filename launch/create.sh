#!/usr/bin/env bash
# Creates a TPU VM or multi-host slice through a queued resource and waits until it is ACTIVE
# (or, with --machine-type, one GPU VM); with --unattended its workers install modjax and train
# by themselves at every boot (launch/startup.sh).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=launch/common_unattended.sh
source "$LAUNCH_DIR/common_unattended.sh"

HELP="usage: launch/create.sh --name NAME --zone ZONE --accelerator TYPE [options]
       launch/create.sh --name NAME --zone ZONE --machine-type GPU_TYPE [options]
       launch/create.sh ... --unattended --config FILE[:ARG] (--bucket gs://B | --workdir gs://P)
           (--repo URL [--ref REF] | --wheel FILE) [--run RUN] [--worker-user U] [-- --config.KEY=VALUE ...]

Creates the queued resource NAME (one TPU VM or a multi-host slice; its node is also NAME) and
waits until it is ACTIVE. A queued resource that already exists is only waited for. Billing
starts at ACTIVE and runs until launch/delete.sh.

With --unattended, no laptop is needed after this: the run (install.sh's and train.sh's options)
is recorded in WORKDIR/launch/run.args and launch/startup.sh goes into the VMs' metadata; every
worker runs it at every boot: it installs modjax, then starts python -m modjax.train (which
resumes from the latest checkpoint) unless WORKDIR/launch/status says the run has ended, and
copies the logs to WORKDIR/logs/. A spot slice that is deleted or suspended on preemption does
not boot again by itself: run launch/supervise.sh with the same options to recreate it.

  --accelerator TYPE       v5litepod-{1,4,8,16,...,256}, v6e-{1,...,256}, v4-{8,16,32,...,4096},
                           v5p-{8,...,4096}, v3-{8,32,...,2048}
  --runtime-version V      TPU software version (default per type: tpu-ubuntu2204-base for v3/v4,
                           v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e)
  --spot                   spot capacity: much cheaper, may be preempted (launch/resume.sh)
  --reserved               capacity from your reservation
  --service-account EMAIL  the VMs' service account (default: Compute Engine's); it needs write
                           access to the run's bucket
  --wait-timeout S         give up waiting after S seconds (default 86400; 0 = forever)
  --no-wait                return once the request is queued
  --machine-type TYPE      a GPU VM instead: a2-highgpu-{1,2,4,8}g, a2-ultragpu-{1,2,4,8}g,
                           a3-highgpu-{1,2,4,8}g, g2-standard-{4,...,96}; with --spot it is
                           stopped (not deleted) on preemption
  --image-family F         GPU VM image (default common-cu128-ubuntu-2204-nvidia-570 of
  --image-project P        deeplearning-platform-release)
  --disk-size SIZE         GPU VM boot disk (default 200GB)
  --unattended             install and train from the startup script (see above); takes
                           --config, --bucket/--workdir, --run, --repo/--ref or --wheel,
                           --python as install.sh and train.sh do, and -- ARGS for modjax.train
  --worker-user U          the workers' user that runs it (default: this machine's user name,
                           as gcloud compute ssh uses it, so logs.sh and stop.sh find the run)
  --project ID             Google Cloud project (default: gcloud's configured one)
  --dry-run                print the gcloud commands instead of running them
  --help                   this text

Examples: launch/create.sh --name modjax-v4-32 --zone us-central2-b --accelerator v4-32 --spot
          launch/create.sh --name modjax-v4-32 --zone us-central2-b --accelerator v4-32 --spot \\
            --unattended --repo https://github.com/ORG/modjax.git --ref v0.1.0 \\
            --bucket gs://my-bucket --config configs/t5_finetune.py:xsum,t5-large -- --config.mesh.fsdp=16"

parse_args "name zone project accelerator runtime-version spot reserved service-account
  wait-timeout no-wait machine-type image-family image-project disk-size unattended config
  bucket workdir run repo ref wheel python worker-user dry-run" "$@"
validate_target
validate_create
if [[ ${OPT[unattended]} == 1 ]]; then
  validate_install
  validate_config
  validate_run_name
  validate_workdir
  train_command
  validate_worker_user
  validate_unattended
else
  ((${#CMD[@]} == 0)) || die "$PROG takes a command after -- only with --unattended"
  for _key in config bucket workdir run repo wheel worker-user; do
    [[ -z ${OPT[$_key]} ]] || die "--$_key is for an unattended run; add --unattended (or give it to train.sh)"
  done
fi
dry_run_header
[[ ${OPT[unattended]} != 1 ]] || record_unattended_run
if gpu; then
  create_gpu
else
  ensure_tpu
fi
