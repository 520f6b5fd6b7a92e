#!/usr/bin/env bash
# Runs one command (python -m modjax.<cli> ...) on every worker at once and streams its log.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELP="usage: launch/run.sh --name NAME --zone ZONE [options] -- COMMAND [ARGS...]

Starts COMMAND in ~/modjax/src with ~/modjax/.venv active on the workers (all of them by
default, as a multi-host JAX program needs), detached: it keeps running when this laptop
disconnects. Each worker logs to ~/modjax/logs/RUN.log; the log of worker 0 is streamed here
until the run ends, and this script exits with the run's status. Ctrl-C stops the streaming,
not the run (launch/logs.sh streams again, launch/stop.sh stops it).

  --run RUN             the run's name on the workers (default: the modjax module, e.g. evaluate)
  --worker all|N        where to run it (default all; a single-host command: 0)
  --follow-worker N     whose log to stream (default 0)
  --upload-logs gs://P  also copy each worker's log to P/logs/RUN.workerI.log (every 5 min
                        and at the end)
  --detach              start it and return
  --gpu                 NAME is a GPU VM made by launch/create.sh --machine-type
  --project ID          Google Cloud project (default: gcloud's configured one)
  --dry-run             print the gcloud commands instead of running them
  --help                this text

Only python -m modjax.train (and modjax.pipeline) joins the hosts of a multi-host slice
(--config.multihost.initialize=True, which launch/train.sh adds); run evaluate, assemble and
merge on a single-host slice or a GPU VM, reading and writing gs:// paths.

Examples:
  launch/run.sh --name modjax-v5e-8 --zone us-west4-a -- python -m modjax.evaluate \\
      --config configs/tiny.py --config.workdir=gs://BUCKET/runs/tiny
  launch/run.sh --name modjax-v5e-8 --zone us-west4-a --worker 0 -- \\
      gcloud storage rsync -r runs/sweep gs://BUCKET/runs/sweep"

parse_args "name zone project gpu run worker follow-worker upload-logs detach dry-run" "$@"
validate_target
((${#CMD[@]} > 0)) ||
  die "missing the command; put it after --, e.g. -- python -m modjax.evaluate --config configs/tiny.py"
if [[ -z ${OPT[run]} ]]; then
  OPT[run]=cmd
  if [[ ${CMD[0]} == python* && ${CMD[1]:-} == -m && ${CMD[2]:-} == modjax.* ]]; then
    OPT[run]=${CMD[2]#modjax.}
  fi
fi
validate_run_name
dry_run_header
start_run
follow_run
