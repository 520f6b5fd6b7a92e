#!/usr/bin/env bash
# Streams a run's log from a worker (or every worker) until the run ends.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELP="usage: launch/logs.sh --name NAME --zone ZONE --run RUN [--worker N|all] [options]

Prints ~/modjax/logs/RUN.log of worker N (default 0; all: every worker, each line prefixed with
its worker index) from the start and follows it while the run lives; exits with the run's
status once it has ended. Ctrl-C stops only the streaming.

  --run RUN        the run's name (launch/train.sh: the --run given, else NAME)
  --worker N|all   whose log (default 0)
  --gpu            NAME is a GPU VM made by launch/create.sh --machine-type
  --project ID     Google Cloud project (default: gcloud's configured one)
  --dry-run        print the gcloud command instead of running it
  --help           this text"

OPT[worker]=0
parse_args "name zone project gpu run worker dry-run" "$@"
((${#CMD[@]} == 0)) || die "$PROG takes no command after --"
validate_target
require run
validate_run_name
dry_run_header
on_workers "${OPT[worker]}" "bash $WORKER_SH logs $(quote_word "${OPT[run]}")"
