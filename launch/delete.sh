#!/usr/bin/env bash
# Deletes the queued resource and its TPU VMs (or the GPU VM): billing stops.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELP="usage: launch/delete.sh --name NAME --zone ZONE [--gpu] [--project ID] [--dry-run]

Deletes the queued resource NAME together with its TPU VMs (--force), or with --gpu the GPU VM
NAME, without asking again. What the runs wrote to gs:// stays; whatever is only on the VMs'
disks (modjax/logs, local outputs) is lost, so copy it first (see launch/README.md).

  --gpu          NAME is a GPU VM made by launch/create.sh --machine-type
  --project ID   Google Cloud project (default: gcloud's configured one)
  --dry-run      print the gcloud command instead of running it
  --help         this text"

parse_args "name zone project gpu dry-run" "$@"
((${#CMD[@]} == 0)) || die "$PROG takes no command after --"
validate_target
dry_run_header
delete_resources
