"""A run checkpointed on 8 devices (data x fsdp x tensor = 2x2x2) resumes on 1 device and ends
where an uninterrupted 1-device run ends: checkpoints restore onto a different mesh."""

import jax
import numpy as np
from train_helpers import micro_config

from modjax.train.loop import train


def test_resume_on_a_different_mesh(tmp_path):
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices before JAX starts"
  sharded = micro_config(
    tmp_path / "moved", train__num_steps=10, mesh__data=2, mesh__fsdp=2, mesh__tensor=2
  )
  first = train(sharded)
  wi = first.state.params["encoder"]["blocks"]["0"]["ffn"]["wi"]["kernel"]
  assert len(wi.sharding.device_set) == 8

  resumed = train(micro_config(tmp_path / "moved", train__num_steps=15, mesh__num_devices=1))
  assert resumed.last_step == 15 and min(resumed.losses) == 11  # only the new steps ran

  straight = train(micro_config(tmp_path / "straight", train__num_steps=15, mesh__num_devices=1))
  losses = {**first.losses, **resumed.losses}
  np.testing.assert_allclose(
    [losses[s] for s in range(1, 16)], [straight.losses[s] for s in range(1, 16)], rtol=1e-5
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
    resumed.state.params,
    straight.state.params,
  )
