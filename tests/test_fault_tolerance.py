"""Killed and resumed training equals uninterrupted training, and a damaged latest checkpoint is
set aside while the run falls back to the previous one.

A ``python -m modjax.train`` subprocess is SIGKILLed at a random step between two checkpoints
(seeded here; progress is read from the metrics JSONL) and restarted with the same command: every
step's loss and the final parameters must equal an uninterrupted in-process run's. That holds
exactly because batches are a deterministic function of the data position stored in the
checkpoint and the step folds its number into the dropout key; the runs use dropout (rate 0.1) so
that the second claim is tested too. The subprocesses see as many fake
CPU devices as this process and use the first one, like the reference run: XLA:CPU splits its
work by the device count, so another count would change the float rounding (not the resumption).
"""

import os
import random
import signal
import time

import jax
import numpy as np
import pytest
from train_helpers import (
  describe,
  jsonl_losses,
  kill,
  losses_in_order,
  micro_config,
  micro_flags,
  run_module,
  start_module,
)

from modjax.store import checkpoint
from modjax.train.loop import train

NUM_STEPS = 30
EVERY = 5
DROPOUT = 0.1
SETTINGS = dict(
  mesh__num_devices=1,
  train__num_steps=NUM_STEPS,
  checkpoint__every_steps=EVERY,
  model__dropout_rate=DROPOUT,
)
KILL_SEED = 20240611
TIMEOUT_S = 240
DEVICES = jax.device_count  # the subprocesses' fake device count: the same as here


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, micro_run):
  """(losses, final state as numpy) of an in-process run that was never stopped, with the
  settings of the subprocess runs here."""
  result = train(micro_config(tmp_path_factory.mktemp("uninterrupted"), **SETTINGS))
  assert result.model.config.dropout_rate == DROPOUT
  # Dropout is really on: the losses differ from conftest's micro run, the same run without it.
  _, without_dropout = micro_run
  assert not np.array_equal(losses_in_order(result.losses), losses_in_order(without_dropout.losses))
  state = {
    "step": result.state.step,
    "params": result.state.params,
    "opt_state": result.state.opt_state,
  }
  return losses_in_order(result.losses), jax.device_get(state)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
  """A run SIGKILLed between two checkpoints, then restarted with the same command to the end."""
  workdir = tmp_path_factory.mktemp("killed")
  flags = micro_flags(workdir, **SETTINGS)
  rng = random.Random(KILL_SEED)
  # Strictly between two checkpoints, after the first one and before the last.
  kill_at = rng.choice([s for s in range(EVERY + 1, NUM_STEPS - EVERY) if s % EVERY])
  with open(workdir / "first_run.log", "w") as log:
    process = start_module("modjax.train", flags, stdout=log, stderr=log, device_count=DEVICES())
    try:
      _wait_for_step(workdir, process, kill_at)
    finally:
      kill(process, signal.SIGKILL)
  assert process.returncode == -signal.SIGKILL
  logged = max(jsonl_losses(workdir))  # the process may have logged more before it died
  finished_before = checkpoint.all_steps(workdir / "checkpoints")
  resumed = run_module("modjax.train", flags, device_count=DEVICES(), timeout=TIMEOUT_S)
  assert resumed.returncode == 0, describe(resumed)
  return dict(
    workdir=workdir,
    kill_at=kill_at,
    logged_at_kill=logged,
    checkpoints_at_kill=finished_before,
    resumed=resumed,
  )


def _wait_for_step(workdir, process, step: int) -> None:
  """Polls the metrics JSONL until it holds ``step``."""
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline:
    if process.poll() is not None:
      with open(os.path.join(workdir, "first_run.log")) as f:
        pytest.fail(
          f"training exited ({process.returncode}) before step {step}:\n{f.read()[-3000:]}"
        )
    try:
      logged = jsonl_losses(workdir)
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
      logged = {}
    if logged and max(logged) >= step:
      return
    time.sleep(0.05)
  pytest.fail(f"training did not reach step {step} within {TIMEOUT_S}s")


def _restore(directory, like):
  """The latest checkpoint in ``directory`` as numpy, read into the structure of ``like``."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
  ckpt = checkpoint.Checkpointer(
    directory, max_to_keep=None, save_interval_steps=1, async_save=False
  )
  try:
    step, state, _ = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  return step, jax.device_get(state)


def test_killed_run_resumes_to_the_uninterrupted_losses_and_parameters(
  uninterrupted, killed_and_resumed
):
  reference_losses, reference_state = uninterrupted
  run = killed_and_resumed
  workdir = run["workdir"]
  # The kill really interrupted training between checkpoints, and the restart resumed.
  assert run["kill_at"] <= run["logged_at_kill"] < NUM_STEPS
  resumed_from = max(run["checkpoints_at_kill"])
  assert EVERY <= resumed_from < NUM_STEPS, run["checkpoints_at_kill"]
  assert f"resumed from step {resumed_from}" in run["resumed"].stderr, describe(run["resumed"])
  # Steps after that checkpoint were logged twice (before the kill and after the restart).
  with open(workdir / "metrics" / "train.jsonl") as f:
    records = [line for line in f if line.strip()]
  assert len(records) == NUM_STEPS + (run["logged_at_kill"] - resumed_from)

  np.testing.assert_array_equal(losses_in_order(jsonl_losses(workdir)), reference_losses)
  step, state = _restore(workdir / "checkpoints", reference_state)
  assert step == NUM_STEPS and int(state["step"]) == NUM_STEPS
  flat_ref = jax.tree_util.tree_flatten_with_path(reference_state["params"])[0]
  flat_got = jax.tree.leaves(state["params"])
  assert len(flat_ref) == len(flat_got)
  for (path, expected), actual in zip(flat_ref, flat_got, strict=True):
    np.testing.assert_array_equal(actual, expected, err_msg=jax.tree_util.keystr(path))
  jax.tree.map(np.testing.assert_array_equal, state["opt_state"], reference_state["opt_state"])


def test_corrupt_latest_checkpoint_falls_back_and_is_kept_aside(uninterrupted, killed_and_resumed):
  reference_losses, _ = uninterrupted
  workdir = killed_and_resumed["workdir"]
  checkpoints = workdir / "checkpoints"
  latest = checkpoint.latest_step(checkpoints)
  assert latest == NUM_STEPS
  step_dir = checkpoints / str(latest)
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  garbage = random.Random(KILL_SEED).randbytes(min(4096, size // 2))
  with open(largest, "r+b") as f:
    f.seek(size // 2)
    f.write(garbage)
  damaged = {os.path.relpath(p, step_dir): open(p, "rb").read() for p in files}

  more_steps = NUM_STEPS + EVERY
  result = run_module(
    "modjax.train",
    micro_flags(workdir, **{**SETTINGS, "train__num_steps": more_steps}),
    device_count=DEVICES(),
    timeout=TIMEOUT_S,
  )
  assert result.returncode == 0, describe(result)
  previous = NUM_STEPS - EVERY
  assert str(step_dir) in result.stderr and "damaged" in result.stderr, describe(result)
  assert f"resumed from step {previous}" in result.stderr, describe(result)

  # The damaged directory is moved aside whole, not deleted.
  aside = [name for name in os.listdir(checkpoints) if name.startswith(f"corrupt.{latest}.")]
  assert len(aside) == 1, os.listdir(checkpoints)
  for relative, content in damaged.items():
    with open(checkpoints / aside[0] / relative, "rb") as f:
      assert f.read() == content, relative
  assert checkpoint.all_steps(checkpoints) == [previous, NUM_STEPS, more_steps]
  # Steps redone after the fallback reproduce the uninterrupted run (rsqrt does not depend on
  # the total number of steps).
  logged = jsonl_losses(workdir)
  assert sorted(logged) == list(range(1, more_steps + 1))
  redone = np.asarray([logged[s] for s in range(previous + 1, NUM_STEPS + 1)])
  np.testing.assert_array_equal(redone, reference_losses[previous:])
