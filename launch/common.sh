# shellcheck shell=bash
# Shared by every launch/*.sh script (sourced, never run): option parsing, validation, the
# dry-run wrapper and the gcloud steps themselves (create, wait, install, start, follow, delete).
# Everything a script is told is validated before its first gcloud call, so a bad option never
# leaves a half-created resource behind; --dry-run prints each command, shell-quoted, exactly as
# it would run, and runs nothing (not even read-only gcloud queries).

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCH_DIR")
PROG=$(basename "$0")
# jax's pin in constraints.txt; the workers add its accelerator extra (tests/test_launch.py checks).
JAX_VERSION=0.10.2
UV_VERSION=0.13.9
POLL_S=${MODJAX_LAUNCH_POLL_S:-30} # seconds between state checks
CLOUD_SCOPE=https://www.googleapis.com/auth/cloud-platform
# Where everything lives on a worker, relative to the login directory: the checkout (configs/,
# launch/) in modjax/src, the virtual environment in modjax/.venv, run logs in modjax/logs.
WORKER_SH=modjax/src/launch/worker.sh
# The VMs' metadata for launch/startup.sh (KEY=VALUE,...); set by create.sh/supervise.sh
# --unattended (common_unattended.sh), empty otherwise.
STARTUP_META=""

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

usage() { printf '%s\n' "$HELP"; }
# --- options ------------------------------------------------------------------------------------
declare -A OPT=()
CMD=()
FLAG_OPTS=" dry-run spot reserved no-wait gpu detach recreate local "
for _key in name zone project accelerator runtime-version service-account wait-timeout \
  machine-type image-family image-project disk-size repo ref wheel python config bucket workdir \
  run worker upload-logs follow-worker $FLAG_OPTS; do
  OPT[$_key]=""
done
OPT[ref]=main
OPT[python]=3.11
OPT[worker]=all
OPT[follow-worker]=0
OPT[wait-timeout]=86400
OPT[image-family]=common-cu128-ubuntu-2204-nvidia-570
OPT[image-project]=deeplearning-platform-release
OPT[disk-size]=200GB

# parse_args "allowed option names" "$@": --key value, --key=value and flags into OPT[key];
# whatever follows "--" into CMD. An option the script does not take is an error, not ignored.
parse_args() {
  local allowed=" ${1//$'\n'/ } " arg key val has_val
  shift
  while (($#)); do
    arg=$1
    case $arg in
      --) shift; CMD=("$@"); return 0 ;;
      -h | --help) usage; exit 0 ;;
      --*=*) key=${arg%%=*}; key=${key#--}; val=${arg#*=}; has_val=1 ;;
      --*) key=${arg#--}; val=""; has_val=0 ;;
      *) die "unexpected argument '$arg'; options start with --, a command to run goes after --" ;;
    esac
    [[ $allowed == *" $key "* ]] || die "unknown option --$key for $PROG; see $PROG --help"
    if [[ $FLAG_OPTS == *" $key "* ]]; then
      ((has_val == 0)) || die "--$key takes no value"
      OPT[$key]=1
    else
      if ((has_val == 0)); then
        (($# >= 2)) && [[ $2 != --* ]] || die "--$key needs a value; see $PROG --help"
        val=$2
        shift
      fi
      OPT[$key]=$val
    fi
    shift
  done
}

declare -A HINT=(
  [name]="pass --name NAME (the queued resource and its TPU VM, or the GPU VM; e.g. --name modjax-v4-32)"
  [zone]="pass --zone ZONE (e.g. --zone us-central2-b for v4, us-west4-a for v5litepod)"
  [accelerator]="pass --accelerator TYPE (e.g. v5litepod-8, v4-32; launch/README.md lists them)"
  [config]="pass --config configs/FILE.py[:ARG] (a path relative to the repository root)"
  [bucket]="pass --bucket gs://BUCKET (the run's workdir becomes gs://BUCKET/runs/RUN) or --workdir gs://BUCKET/PATH"
  [run]="pass --run RUN (the name a run's log has on the workers)"
)

require() {
  local key
  for key in "$@"; do
    [[ -n ${OPT[$key]} ]] || die "missing --$key; ${HINT[$key]:-see $PROG --help}"
  done
}

dry_run() { [[ ${OPT[dry-run]} == 1 ]]; }
here() { [[ ${OPT[local]} == 1 ]]; } # install.sh --local: this machine is the worker
gpu() { [[ ${OPT[gpu]} == 1 || -n ${OPT[machine-type]} ]]; }

validate_target() {
  require name zone
  [[ ${OPT[name]} =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "bad --name '${OPT[name]}'; use lowercase letters, digits and hyphens, starting with a letter (at most 63)"
  [[ ${OPT[zone]} =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "bad --zone '${OPT[zone]}'; a zone looks like us-central2-b (region, hyphen, letter)"
  [[ -z ${OPT[project]} || ${OPT[project]} =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] ||
    die "bad --project '${OPT[project]}'; pass the project ID (e.g. my-project-123), not its name or number"
  [[ ${OPT[worker]} =~ ^(all|[0-9]+)$ ]] || die "bad --worker '${OPT[worker]}'; use all or a worker index (0, 1, ...)"
  [[ ${OPT[follow-worker]} =~ ^[0-9]+$ ]] || die "bad --follow-worker '${OPT[follow-worker]}'; use a worker index (0, 1, ...)"
  PROJECT_ARGS=()
  [[ -z ${OPT[project]} ]] || PROJECT_ARGS=("--project=${OPT[project]}")
}

# The known TPU slices. v3/v4/v5p sizes count TensorCores (8 per host; v4 and v5p have 2 per
# chip, one JAX device each), v5litepod/v6e sizes count chips (up to 8 on one host, then 4 per
# host). Sets TPU_HOSTS, TPU_DEVICES and TPU_RUNTIME (the default --runtime-version).
tpu_lookup() {
  local acc=$1 family=${1%-*} size=${1##*-} sizes
  case $family in
    v3) sizes="8 32 64 128 256 512 1024 2048" TPU_RUNTIME=tpu-ubuntu2204-base ;;
    v4) sizes="8 16 32 64 128 256 512 1024 2048 4096" TPU_RUNTIME=tpu-ubuntu2204-base ;;
    v5p) sizes="8 16 32 64 128 256 512 1024 2048 4096" TPU_RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod) sizes="1 4 8 16 32 64 128 256" TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e) sizes="1 4 8 16 32 64 128 256" TPU_RUNTIME=v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type '$acc'; use a TPU type such as v5litepod-8, v6e-8, v4-32, v5p-8 or v3-8" ;;
  esac
  [[ " $sizes " == *" $size "* ]] ||
    die "unknown accelerator type '$acc'; $family comes as $family-{${sizes// /,}}"
  case $family in
    v3) TPU_HOSTS=$((size / 8)) TPU_DEVICES=$size ;;
    v4 | v5p) TPU_HOSTS=$((size / 8)) TPU_DEVICES=$((size / 2)) ;;
    *) TPU_HOSTS=$((size <= 8 ? 1 : size / 4)) TPU_DEVICES=$size ;;
  esac
}

# The known GPU machine types (their GPUs come attached). Sets GPU_COUNT and GPU_KIND.
gpu_lookup() {
  case $1 in
    a2-highgpu-1g | a2-highgpu-2g | a2-highgpu-4g | a2-highgpu-8g | a2-megagpu-16g) GPU_KIND="A100 40GB" ;;
    a2-ultragpu-1g | a2-ultragpu-2g | a2-ultragpu-4g | a2-ultragpu-8g) GPU_KIND="A100 80GB" ;;
    a3-highgpu-1g | a3-highgpu-2g | a3-highgpu-4g | a3-highgpu-8g | a3-megagpu-8g) GPU_KIND="H100 80GB" ;;
    g2-standard-4 | g2-standard-8 | g2-standard-12 | g2-standard-16 | g2-standard-32) GPU_KIND="L4" GPU_COUNT=1 ;;
    g2-standard-24) GPU_KIND="L4" GPU_COUNT=2 ;;
    g2-standard-48) GPU_KIND="L4" GPU_COUNT=4 ;;
    g2-standard-96) GPU_KIND="L4" GPU_COUNT=8 ;;
    *) die "unknown GPU machine type '$1'; use a2-highgpu-{1,2,4,8}g, a2-ultragpu-{1,2,4,8}g, a3-highgpu-{1,2,4,8}g or g2-standard-{4,...,96}" ;;
  esac
  [[ $1 != a* ]] || GPU_COUNT=$(sed -E 's/.*-([0-9]+)g$/\1/' <<<"$1")
}

validate_create() {
  if [[ -n ${OPT[machine-type]} ]]; then
    [[ -z ${OPT[accelerator]} ]] || die "--accelerator (TPU) and --machine-type (GPU VM) exclude each other; pass one"
    [[ ${OPT[reserved]} != 1 ]] || die "--reserved is for TPU queued resources; a GPU VM uses a reservation by default when one matches"
    gpu_lookup "${OPT[machine-type]}"
  else
    require accelerator
    tpu_lookup "${OPT[accelerator]}"
    [[ -n ${OPT[runtime-version]} ]] || OPT[runtime-version]=$TPU_RUNTIME
  fi
  [[ ${OPT[spot]} != 1 || ${OPT[reserved]} != 1 ]] || die "--spot and --reserved exclude each other; pass one (or neither: on demand)"
  [[ ${OPT[wait-timeout]} =~ ^[0-9]+$ ]] || die "bad --wait-timeout '${OPT[wait-timeout]}'; use seconds (0 = wait forever)"
}

validate_install() {
  if [[ -n ${OPT[wheel]} ]]; then
    [[ -z ${OPT[repo]} ]] || die "--wheel and --repo exclude each other; pass one"
    [[ ${OPT[wheel]} == *.whl && -f ${OPT[wheel]} ]] ||
      die "--wheel ${OPT[wheel]} is not a wheel file; build one with 'pip wheel --no-deps -w dist .'"
  elif [[ -z ${OPT[repo]} ]]; then
    die "missing --repo or --wheel; pass --repo GIT_URL [--ref BRANCH|TAG|COMMIT] or --wheel dist/modjax-*.whl"
  fi
  [[ ${OPT[python]} =~ ^3\.[0-9]+$ ]] || die "bad --python '${OPT[python]}'; use a version such as 3.11"
}

validate_run_name() {
  [[ -z ${OPT[run]} || ${OPT[run]} =~ ^[A-Za-z0-9][-A-Za-z0-9_.]*$ ]] ||
    die "bad --run '${OPT[run]}'; use letters, digits, '-', '_' and '.'"
  [[ -z ${OPT[upload-logs]} || ${OPT[upload-logs]} == gs://?* ]] ||
    die "bad --upload-logs '${OPT[upload-logs]}'; pass a gs://BUCKET/PATH URL"
}

# The config file part of --config (before ':') must exist in this checkout: the workers run
# the same file from theirs.
validate_config() {
  require config
  local file=${OPT[config]%%:*}
  [[ -f $REPO_DIR/$file ]] ||
    die "config file $file not found under $REPO_DIR; pass a path relative to the repository root (e.g. configs/tiny.py)"
}

# The run's workdir: --workdir, else BUCKET/runs/RUN. It must be gs://: every worker (and the
# next VM after a preemption) has to see the same checkpoints.
validate_workdir() {
  [[ -n ${OPT[run]} ]] || OPT[run]=${OPT[name]}
  if [[ -z ${OPT[workdir]} ]]; then
    require bucket
    [[ ${OPT[bucket]} =~ ^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]/?$ ]] ||
      die "bad --bucket '${OPT[bucket]}'; pass a bucket URL such as gs://my-bucket (no path; --workdir takes one)"
    OPT[workdir]=${OPT[bucket]%/}/runs/${OPT[run]}
  fi
  [[ ${OPT[workdir]} == gs://?* ]] ||
    die "bad --workdir '${OPT[workdir]}'; it must be a gs:// URL so every worker and a resumed run see it"
  [[ -n ${OPT[upload-logs]} ]] || OPT[upload-logs]=${OPT[workdir]}
}

# --- running ----------------------------------------------------------------------------------
quote_word() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_words() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote_word "$w")"; done
  printf '%s' "$out"
}

# run CMD...: prints the command (dry run) or traces it to stderr and runs it.
run() {
  if dry_run; then
    printf '%s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
    "$@"
  fi
}

note() {
  if dry_run; then printf '# %s\n' "$*"; else printf '%s: %s\n' "$PROG" "$*" >&2; fi
}

on_workers() { # WORKER COMMAND: one shell command on a TPU worker (or all) or the GPU VM
  if here; then
    run bash -c "cd && $2"
  elif gpu; then
    run gcloud compute ssh "${OPT[name]}" "--zone=${OPT[zone]}" "--command=$2" "${PROJECT_ARGS[@]}"
  else
    run gcloud compute tpus tpu-vm ssh "${OPT[name]}" "--zone=${OPT[zone]}" "--worker=$1" \
      "--command=$2" "${PROJECT_ARGS[@]}"
  fi
}

copy_to_workers() { # DEST SRC...: copies local files to every worker (or the GPU VM)
  local dest=$1
  shift
  if here; then
    run cp -r "$@" "$HOME/$dest"
  elif gpu; then
    run gcloud compute scp --recurse "$@" "${OPT[name]}:$dest" "--zone=${OPT[zone]}" "${PROJECT_ARGS[@]}"
  else
    run gcloud compute tpus tpu-vm scp --recurse "$@" "${OPT[name]}:$dest" "--zone=${OPT[zone]}" \
      --worker=all "${PROJECT_ARGS[@]}"
  fi
}

qr_state() { # the queued resource's state, or NOT_FOUND
  gcloud compute tpus queued-resources describe "${OPT[name]}" "--zone=${OPT[zone]}" \
    "--format=value(state.state)" "${PROJECT_ARGS[@]}" 2>/dev/null || echo NOT_FOUND
}

vm_state() { # the GPU VM's status, or NOT_FOUND
  gcloud compute instances describe "${OPT[name]}" "--zone=${OPT[zone]}" \
    "--format=value(status)" "${PROJECT_ARGS[@]}" 2>/dev/null || echo NOT_FOUND
}

qr_describe() { # dry run: prints the describe command; otherwise echoes the state or NOT_FOUND
  local q=(gcloud compute tpus queued-resources describe "${OPT[name]}" "--zone=${OPT[zone]}"
    "--format=value(state.state)" "${PROJECT_ARGS[@]}")
  if dry_run; then run "${q[@]}"; else "${q[@]}" 2>/dev/null || echo NOT_FOUND; fi
}

# --- the steps --------------------------------------------------------------------------------
create_tpu() {
  local extra=()
  [[ ${OPT[spot]} != 1 ]] || extra+=(--spot)
  [[ ${OPT[reserved]} != 1 ]] || extra+=(--reserved)
  [[ -z ${OPT[service-account]} ]] || extra+=("--service-account=${OPT[service-account]}")
  [[ -z $STARTUP_META ]] ||
    extra+=("--metadata-from-file=startup-script=$LAUNCH_DIR/startup.sh" "--metadata=$STARTUP_META")
  note "${OPT[accelerator]}: $TPU_HOSTS host(s), $TPU_DEVICES JAX devices, runtime ${OPT[runtime-version]}"
  run gcloud compute tpus queued-resources create "${OPT[name]}" "--node-id=${OPT[name]}" \
    "--zone=${OPT[zone]}" "--accelerator-type=${OPT[accelerator]}" \
    "--runtime-version=${OPT[runtime-version]}" "--scopes=$CLOUD_SCOPE" "${extra[@]}" \
    "${PROJECT_ARGS[@]}"
}

# Polls until the queued resource is ACTIVE (its TPU VMs are up and billed from then on).
wait_tpu() {
  [[ ${OPT[no-wait]} != 1 ]] || return 0
  if dry_run; then
    qr_describe
    note "repeated every ${POLL_S}s until the state is ACTIVE"
    return 0
  fi
  local start=$SECONDS state limit=${OPT[wait-timeout]}
  while :; do
    state=$(qr_describe)
    case $state in
      ACTIVE) note "queued resource ${OPT[name]} is ACTIVE"; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | NOT_FOUND)
        printf 'error: queued resource %s is %s; launch/resume.sh deletes and recreates it\n' \
          "${OPT[name]}" "$state" >&2
        exit 1 ;;
    esac
    if ((limit > 0 && SECONDS - start >= limit)); then
      printf 'error: queued resource %s still %s after %ss; rerun to keep waiting, or launch/delete.sh\n' \
        "${OPT[name]}" "$state" "$limit" >&2
      exit 1
    fi
    note "${OPT[name]}: $state (waited $((SECONDS - start))s)"
    sleep "$POLL_S"
  done
}

# Creates the queued resource unless it exists already, then waits for ACTIVE.
ensure_tpu() {
  local state=NOT_FOUND
  dry_run || state=$(qr_describe)
  if [[ $state == NOT_FOUND ]]; then
    create_tpu
  else
    note "queued resource ${OPT[name]} exists ($state); not creating it again"
  fi
  wait_tpu
}

create_gpu() {
  local extra=()
  [[ ${OPT[spot]} != 1 ]] || extra+=(--provisioning-model=SPOT --instance-termination-action=STOP)
  [[ -z ${OPT[service-account]} ]] || extra+=("--service-account=${OPT[service-account]}")
  [[ -z $STARTUP_META ]] || extra+=("--metadata-from-file=startup-script=$LAUNCH_DIR/startup.sh")
  note "${OPT[machine-type]}: $GPU_COUNT x $GPU_KIND on one VM"
  run gcloud compute instances create "${OPT[name]}" "--zone=${OPT[zone]}" \
    "--machine-type=${OPT[machine-type]}" "--image-family=${OPT[image-family]}" \
    "--image-project=${OPT[image-project]}" "--boot-disk-size=${OPT[disk-size]}" \
    --maintenance-policy=TERMINATE "--metadata=install-nvidia-driver=True${STARTUP_META:+,$STARTUP_META}" \
    "--scopes=$CLOUD_SCOPE" "${extra[@]}" "${PROJECT_ARGS[@]}"
}

# Installs modjax into modjax/.venv on every worker (uv brings Python 3.11 when the image has an
# older one), with jax's accelerator extra, from a git ref or a local wheel; the checkout's
# configs/ and launch/ end up in modjax/src, where every run starts.
install_workers() {
  local jax_extra=tpu pkg c
  ! gpu || jax_extra=cuda12
  c='set -euo pipefail; mkdir -p modjax/src modjax/logs; '
  if gpu; then # waits for the driver the image installs at first boot
    # shellcheck disable=SC2016  # expanded on the worker
    c+='for _ in $(seq 90); do nvidia-smi -L >/dev/null 2>&1 && break; sleep 10; done; nvidia-smi -L; '
  fi
  if [[ -n ${OPT[wheel]} ]]; then
    on_workers all 'mkdir -p modjax/src'
    copy_to_workers modjax/ "${OPT[wheel]}"
    copy_to_workers modjax/src/ "$REPO_DIR/configs" "$REPO_DIR/launch"
    pkg=./modjax/$(basename "${OPT[wheel]}")
  else
    c+="git init -q modjax/src; git -C modjax/src fetch -q --depth=1 $(quote_words "${OPT[repo]}" "${OPT[ref]}"); "
    c+='git -C modjax/src checkout -q --detach FETCH_HEAD; '
    pkg=./modjax/src
  fi
  c+="python3 -m pip install --user --quiet uv==$UV_VERSION; "
  c+="\$HOME/.local/bin/uv venv --quiet --allow-existing --python ${OPT[python]} modjax/.venv; "
  c+="\$HOME/.local/bin/uv pip install --quiet --python modjax/.venv/bin/python "
  c+="$(quote_words "jax[$jax_extra]==$JAX_VERSION" "$pkg"); "
  c+="modjax/.venv/bin/python -c 'import jax, modjax; print(\"modjax installed; jax\", jax.__version__)'"
  on_workers all "$c"
}

# Starts CMD detached on the workers (it outlives this ssh session and the laptop's connection).
start_run() {
  local remote
  remote="bash $WORKER_SH start $(quote_words "${OPT[run]}" "${OPT[upload-logs]}") -- $(quote_words "${CMD[@]}")"
  on_workers "${OPT[worker]}" "$remote"
}

# Streams a run's log from one worker until the run ends; exits with the run's status.
follow_run() {
  local w=${OPT[follow-worker]}
  [[ ${OPT[worker]} == all ]] || w=${OPT[worker]}
  if [[ ${OPT[detach]} == 1 ]]; then
    note "started; follow it with: launch/logs.sh --name ${OPT[name]} --zone ${OPT[zone]} --run ${OPT[run]}"
    return 0
  fi
  note "streaming worker $w's log; Ctrl-C stops the streaming, not the run"
  on_workers "$w" "bash $WORKER_SH logs $(quote_word "${OPT[run]}")"
}

delete_resources() {
  if gpu; then
    run gcloud compute instances delete "${OPT[name]}" "--zone=${OPT[zone]}" --quiet "${PROJECT_ARGS[@]}"
  else
    run gcloud compute tpus queued-resources delete "${OPT[name]}" "--zone=${OPT[zone]}" --force \
      --quiet "${PROJECT_ARGS[@]}"
  fi
}

# The training command: the config, the gs:// workdir, and on TPU jax.distributed.initialize()
# (it reads the slice's topology from the TPU metadata; one host or many). CMD holds the extra
# --config.* overrides given after --.
train_command() {
  local extra=("${CMD[@]}") a
  for a in "${extra[@]}"; do
    [[ $a != --config.workdir* ]] || die "pass the workdir as --workdir (or --bucket), not after --"
    [[ $a != --config=* && $a != --config ]] || die "pass the config as --config, not after --"
  done
  CMD=(python -m modjax.train --config "${OPT[config]}" "--config.workdir=${OPT[workdir]}")
  gpu || CMD+=(--config.multihost.initialize=True)
  CMD+=("${extra[@]}")
}

dry_run_header() {
  ! dry_run || note "dry run: the commands $PROG would run, in order; nothing is executed"
}
