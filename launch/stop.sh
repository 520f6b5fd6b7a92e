#!/usr/bin/env bash
# Stops a run on the workers (its process group: the command and its log uploader).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELP="usage: launch/stop.sh --name NAME --zone ZONE --run RUN [--worker all|N] [options]

Sends SIGTERM to the run RUN on every worker (default) or worker N. A stopped training run
resumes from its latest checkpoint when started again with the same command.

  --run RUN        the run's name
  --worker all|N   where to stop it (default all)
  --gpu            NAME is a GPU VM made by launch/create.sh --machine-type
  --project ID     Google Cloud project (default: gcloud's configured one)
  --dry-run        print the gcloud command instead of running it
  --help           this text"

parse_args "name zone project gpu run worker dry-run" "$@"
((${#CMD[@]} == 0)) || die "$PROG takes no command after --"
validate_target
require run
validate_run_name
dry_run_header
on_workers "${OPT[worker]}" "bash $WORKER_SH stop $(quote_word "${OPT[run]}")"
