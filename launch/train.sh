#!/usr/bin/env bash
# python -m modjax.train on every worker at once, checkpoints and summaries in a gs:// workdir.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELP="usage: launch/train.sh --name NAME --zone ZONE --config FILE[:ARG] (--bucket gs://B | --workdir gs://P) [options] [-- --config.KEY=VALUE ...]

Runs, on every worker at once (detached; see launch/run.sh):
  python -m modjax.train --config FILE[:ARG] --config.workdir=WORKDIR \\
      --config.multihost.initialize=True [--config.KEY=VALUE ...]
jax.distributed.initialize() reads the slice's topology from the TPU metadata, so one host
and many run the same command (a GPU VM is one process and leaves it out). The workdir is
gs:// so that every host and the next VM after a preemption see the same checkpoints,
TensorBoard summaries and metrics; the same command again resumes from the latest checkpoint.
Each worker's log is copied to WORKDIR/logs/.

  --config FILE[:ARG]   a config of this checkout, e.g. configs/t5_finetune.py:xsum,t5-base
  --bucket gs://B       the workdir becomes gs://B/runs/RUN
  --workdir gs://P      the workdir itself
  --run RUN             the run's name (default: NAME)
  --follow-worker N     whose log to stream (default 0)
  --detach              start it and return
  --gpu                 NAME is a GPU VM made by launch/create.sh --machine-type
  --project ID          Google Cloud project (default: gcloud's configured one)
  --dry-run             print the gcloud commands instead of running them
  --help                this text
  -- ARGS               more flags for modjax.train (mesh, batch, steps: see launch/README.md)

Example: launch/train.sh --name modjax-v4-32 --zone us-central2-b --bucket gs://my-bucket \\
           --config configs/t5_finetune.py:xsum,t5-large -- --config.mesh.fsdp=16 --config.mesh.data=1"

parse_args "name zone project gpu config bucket workdir run follow-worker detach dry-run" "$@"
validate_target
validate_config
validate_run_name
validate_workdir
train_command
dry_run_header
note "workdir ${OPT[workdir]}; TensorBoard: tensorboard --logdir ${OPT[workdir]}/tensorboard"
start_run
follow_run
