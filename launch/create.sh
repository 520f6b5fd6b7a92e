#!/usr/bin/env bash
# Creates a TPU VM or multi-host slice through a queued resource and waits until it is ACTIVE
# (or, with --machine-type, one GPU VM).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELP="usage: launch/create.sh --name NAME --zone ZONE --accelerator TYPE [options]
       launch/create.sh --name NAME --zone ZONE --machine-type GPU_TYPE [options]

Creates the queued resource NAME (one TPU VM or a multi-host slice; its node is also NAME) and
waits until it is ACTIVE. A queued resource that already exists is only waited for. Billing
starts at ACTIVE and runs until launch/delete.sh.

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
  --project ID             Google Cloud project (default: gcloud's configured one)
  --dry-run                print the gcloud commands instead of running them
  --help                   this text

Example: launch/create.sh --name modjax-v4-32 --zone us-central2-b --accelerator v4-32 --spot"

parse_args "name zone project accelerator runtime-version spot reserved service-account
  wait-timeout no-wait machine-type image-family image-project disk-size dry-run" "$@"
((${#CMD[@]} == 0)) || die "$PROG takes no command after --"
validate_target
validate_create
dry_run_header
if gpu; then
  create_gpu
else
  ensure_tpu
fi
