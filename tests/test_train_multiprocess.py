"""Two local CPU processes (2 fake devices each, one global mesh of 4 joined through
``jax.distributed`` with gloo collectives) train exactly like one process with 4 devices:
``data.host_split="rows"`` gives both processes the same global batch, and the losses that
process 0 logs match the single-process run's to 1e-5."""

import os

import numpy as np
import pytest
from train_helpers import (
  free_port,
  jsonl_losses,
  kill,
  losses_in_order,
  micro_config,
  micro_flags,
  start_module,
  subprocess_env,
  wait_all,
)

from modjax.train.loop import train

NUM_STEPS = 10
MESH = dict(mesh__data=-1, mesh__fsdp=2)  # params sharded across the two processes' devices
TIMEOUT_S = 300


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path):
  workdir = tmp_path / "two_processes"
  port = free_port()
  common = micro_flags(
    workdir, train__num_steps=NUM_STEPS, checkpoint__every_steps=5, data__host_split="rows", **MESH
  )
  processes, logs = [], []
  try:
    for process_id in range(2):
      flags = common + [
        "--config.multihost.initialize=True",
        f"--config.multihost.coordinator_address=127.0.0.1:{port}",
        "--config.multihost.num_processes=2",
        f"--config.multihost.process_id={process_id}",
      ]
      log = open(tmp_path / f"process_{process_id}.log", "w+")
      logs.append(log)
      processes.append(
        start_module(
          "modjax.train", flags, stdout=log, stderr=log, env=subprocess_env(device_count=2)
        )
      )
    # The single-process reference trains here while the two processes start up.
    reference = train(
      micro_config(
        tmp_path / "one_process",
        mesh__num_devices=4,
        train__num_steps=NUM_STEPS,
        checkpoint__every_steps=5,
        data__host_split="rows",
        **MESH,
      )
    )
    codes = wait_all(processes, TIMEOUT_S)
    for process_id, (code, log) in enumerate(zip(codes, logs, strict=True)):
      log.seek(0)
      assert code == 0, f"process {process_id} exited with {code}:\n{log.read()[-3000:]}"
  finally:
    for process in processes:
      kill(process)
    for log in logs:
      log.close()

  logged = jsonl_losses(workdir)
  assert sorted(logged) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose(losses_in_order(logged), losses_in_order(reference.losses), rtol=1e-5)
  # Both processes took part in the multi-process checkpoint saves.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]
