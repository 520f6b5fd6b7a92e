"""Shared helpers of the training tests: a micro config for a tmp workdir, the same settings as
command-line flags, and subprocess runners with a timeout that always kill what they started.

Every run here is small (preset ``micro``, batch 8, 32/16 tokens, a ~200-piece vocabulary) so
the whole set of training tests stays within a few minutes on two CPU cores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")
TRACEBACK = "Traceback (most recent call last)"

# The micro settings on top of configs/tiny.py, as dotted keys (shared by in-process and CLI runs).
MICRO = {
  "model.preset": "micro",
  "data.vocab_size": 200,
  "data.inputs_length": 32,
  "data.targets_length": 16,
  "train.batch_size": 8,
  "train.num_steps": 30,
  "train.log_every": 10,
  "optimizer.warmup_steps": 5,
  "checkpoint.every_steps": 10,
  "eval.max_examples": 8,
  "eval.batch_size": 8,
  "eval.max_new_tokens": 8,
}


@contextlib.contextmanager
def compilation_cache(directory: str, min_compile_seconds: float = 0.5):
  """Within the block, JAX's persistent compilation cache is ``directory``, for this process and
  (through the environment) for the subprocesses it starts; restored afterwards."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cache

  env = {
    "JAX_COMPILATION_CACHE_DIR": directory,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(min_compile_seconds),
  }
  saved_env = {k: os.environ.get(k) for k in env}
  saved_config = (
    jax.config.jax_compilation_cache_dir,
    jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  os.environ.update(env)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  cache.reset_cache()
  try:
    yield
  finally:
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    jax.config.update("jax_compilation_cache_dir", saved_config[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved_config[1])
    cache.reset_cache()


def load_tiny_config():
  """``configs/tiny.py``'s locked ConfigDict (``configs`` is not a package)."""
  spec = importlib.util.spec_from_file_location("modjax_configs_tiny", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def set_key(cfg, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for name in parents:
    node = node[name]
  node[leaf] = value


def micro_config(workdir, **overrides):
  """The tiny config shrunk to ``micro`` for ``workdir``; ``overrides`` use ``__`` for dots,
  e.g. ``micro_config(d, mesh__num_devices=1, train__num_steps=5)``."""
  cfg = load_tiny_config()
  cfg.workdir = str(workdir)
  for key, value in {**MICRO, **_dotted(overrides)}.items():
    set_key(cfg, key, value)
  return cfg


def micro_flags(workdir, **overrides) -> list[str]:
  """The command-line flags that give ``micro_config(workdir, **overrides)``."""
  values = {**MICRO, **_dotted(overrides)}
  return ["--config", TINY_CONFIG, f"--config.workdir={workdir}"] + [
    f"--config.{k}={v}" for k, v in values.items()
  ]


def _dotted(overrides: dict) -> dict:
  return {k.replace("__", "."): v for k, v in overrides.items()}


def losses_in_order(losses: dict[int, float]) -> np.ndarray:
  steps = sorted(losses)
  assert steps == list(range(1, len(steps) + 1)), f"steps are not 1..N: {steps}"
  return np.asarray([losses[s] for s in steps])


def jsonl_losses(workdir) -> dict[int, float]:
  """{step: loss} from ``workdir/metrics/train.jsonl`` (the last record of a step wins)."""
  from modjax.train.plots import read_metrics

  path = os.path.join(str(workdir), "metrics", "train.jsonl")
  return {step: record["loss"] for step, record in read_metrics(path).items()}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(device_count: int = 8, **extra) -> dict:
  """This environment with JAX on ``device_count`` fake CPU devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={device_count}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def module_command(module: str, args: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", module, *args]


def run_module(
  module: str,
  args: Sequence[str],
  *,
  timeout: float = 180,
  device_count: int = 8,
  env: dict | None = None,
) -> subprocess.CompletedProcess:
  """Runs ``python -m module args`` to completion (killed after ``timeout`` seconds)."""
  return subprocess.run(
    module_command(module, args),
    cwd=REPO,
    env=env or subprocess_env(device_count),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start_module(
  module: str,
  args: Sequence[str],
  *,
  stdout,
  stderr,
  device_count: int = 8,
  env: dict | None = None,
) -> subprocess.Popen:
  """Starts ``python -m module args`` in its own process group (see :func:`kill`)."""
  return subprocess.Popen(
    module_command(module, args),
    cwd=REPO,
    env=env or subprocess_env(device_count),
    stdout=stdout,
    stderr=stderr,
    start_new_session=True,
  )


def kill(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
  """Sends ``sig`` to a process started by :func:`start_module` (and its children) and reaps it."""
  if process.poll() is None:
    try:
      os.killpg(process.pid, sig)
    except ProcessLookupError:
      pass
  process.wait(timeout=30)


def wait_all(processes: Sequence[subprocess.Popen], timeout: float) -> list[int]:
  """Exit codes of ``processes``; kills all of them if any is still running after ``timeout``."""
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in processes]
  finally:
    for p in processes:
      kill(p)


def describe(result) -> str:
  """Exit code and the tail of stderr, for assertion messages."""
  stderr = result.stderr if isinstance(result.stderr, str) else ""
  return f"exit code {result.returncode}; stderr tail:\n{stderr[-3000:]}"


# --- Many CLI runs in one interpreter -------------------------------------------------------------
#
# ``python tests/train_helpers.py cli-cases CASES.json RESULTS.json`` imports modjax (JAX, TF, seqio,
# Orbax: most of a CLI run's start-up time) once, then runs each case's ``python -m <module> <args>``
# in a fork of itself via runpy, exactly as the interpreter would run the module: its own flags,
# exit code, stdout and stderr (an uncaught exception prints Python's traceback and exits 1). No
# JAX or TF computation runs before the forks, so each child initialises its backends itself.


def run_cli_cases(cases: list[dict], results_path: str, timeout: float = 120) -> None:
  import json
  import runpy  # noqa: F401  (imported before forking)
  import traceback  # noqa: F401

  import modjax.core.cli  # noqa: F401
  import modjax.evaluate  # noqa: F401
  import modjax.train.loop  # noqa: F401
  from modjax.data import tf_setup

  tf_setup.load()  # TensorFlow and seqio are imported on first use: import them once, here

  results = []
  for case in cases:
    out_path, err_path = case["stdout_path"], case["stderr_path"]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _run_module_in_child(case["module"], case["args"], out_path, err_path)
    start = time.monotonic()
    code = _wait_child(pid, timeout)
    with open(out_path) as out, open(err_path) as err:
      results.append(
        {
          "id": case["id"],
          "code": code,
          "stdout": out.read(),
          "stderr": err.read(),
          "seconds": time.monotonic() - start,
        }
      )
  with open(results_path, "w") as f:
    json.dump(results, f)


def run_cli_batch(
  cases: Sequence[tuple[str, str, Sequence[str]]],
  directory,
  *,
  device_count: int = 8,
  timeout: float = 600,
) -> dict[str, subprocess.CompletedProcess]:
  """Runs each case ``(id, module, args)``, in order, as ``python -m module args`` through one
  driver (:func:`run_cli_cases`: modjax imported once, each case in a fork of it); returns {id:
  CompletedProcess with its exit code, stdout and stderr}. ``directory`` receives the cases'
  files; a later case may read what an earlier one wrote."""
  import json

  prepared = [
    dict(
      id=case_id,
      module=module,
      args=[str(a) for a in args],
      stdout_path=os.path.join(str(directory), f"{case_id}.out"),
      stderr_path=os.path.join(str(directory), f"{case_id}.err"),
    )
    for case_id, module, args in cases
  ]
  cases_path = os.path.join(str(directory), "cases.json")
  results_path = os.path.join(str(directory), "results.json")
  with open(cases_path, "w") as f:
    json.dump(prepared, f)
  done = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "cli-cases", cases_path, results_path],
    cwd=REPO,
    env=subprocess_env(device_count),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(results_path) as f:
    results = {r["id"]: r for r in json.load(f)}
  return {
    case["id"]: subprocess.CompletedProcess(
      module_command(case["module"], case["args"]),
      results[case["id"]]["code"],
      results[case["id"]]["stdout"],
      results[case["id"]]["stderr"],
    )
    for case in prepared
  }


def _run_module_in_child(module: str, args: list[str], out_path: str, err_path: str):
  import runpy
  import traceback

  code = 1
  try:
    for fd, path in ((1, out_path), (2, err_path)):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [module, *args]
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:  # what the interpreter does with sys.exit(...)
      if e.code is None or isinstance(e.code, int):
        code = e.code or 0
      else:
        print(e.code, file=sys.stderr)
    except BaseException:
      traceback.print_exc()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait_child(pid: int, timeout: float) -> int:
  deadline = time.monotonic() + timeout
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    if time.monotonic() > deadline:
      os.kill(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      return -signal.SIGKILL
    time.sleep(0.02)


if __name__ == "__main__":
  import json

  if len(sys.argv) != 4 or sys.argv[1] != "cli-cases":
    sys.exit("usage: python tests/train_helpers.py cli-cases CASES.json RESULTS.json")
  with open(sys.argv[2]) as f:
    run_cli_cases(json.load(f), sys.argv[3])
