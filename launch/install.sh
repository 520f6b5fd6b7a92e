#!/usr/bin/env bash
# Installs modjax on every worker of a TPU VM/slice (or the GPU VM) from a git ref or a wheel.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELP="usage: launch/install.sh --name NAME --zone ZONE (--repo URL [--ref REF] | --wheel FILE) [options]
       launch/install.sh --local (--repo URL [--ref REF] | --wheel FILE) [options]

On every worker at once: a Python ${OPT[python]} virtual environment in ~/modjax/.venv (uv fetches
that Python when the image has an older one), jax[tpu]==$JAX_VERSION (jax[cuda12] with --gpu)
and modjax, plus the checkout's configs/ and launch/ in ~/modjax/src, where runs start.
Running it again updates the install in place.

  --repo URL       a git URL the workers can fetch (https://..., or a mirror)
  --ref REF        branch, tag or commit of --repo (default main)
  --wheel FILE     a local wheel (pip wheel --no-deps -w dist .); this checkout's configs/
                   and launch/ are copied beside it
  --python X.Y     the workers' Python (default ${OPT[python]}; modjax needs 3.11)
  --gpu            NAME is a GPU VM made by launch/create.sh --machine-type
  --local          install on this machine, in \$HOME (what a worker's launch/startup.sh does
                   at boot) instead of over ssh; --name and --zone are then not needed
  --project ID     Google Cloud project (default: gcloud's configured one)
  --dry-run        print the gcloud commands instead of running them
  --help           this text

Example: launch/install.sh --name modjax-v4-32 --zone us-central2-b \\
           --repo https://github.com/ORG/modjax.git --ref v0.1.0"

parse_args "name zone project gpu repo ref wheel python local dry-run" "$@"
((${#CMD[@]} == 0)) || die "$PROG takes no command after --"
here || validate_target
validate_install
dry_run_header
install_workers
