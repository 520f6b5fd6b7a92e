"""A method trains part of a bank against a frozen rest: only the trainable part moves and only
it carries optimizer state; frozen parameters are sharded by their logical axes."""

import jax
import numpy as np
import pytest
from train_helpers import micro_config

from modjax.core.presets import get_preset
from modjax.models import T5
from modjax.train import experiment, losses
from modjax.train.loop import train
from modjax.train.step import merge_params, partition_params


def test_partition_and_merge_are_inverse():
  bank = {"a": {"x": np.ones(2), "y": np.zeros(3)}, "b": np.ones(1)}
  trainable, frozen = partition_params(bank, lambda path: path[-1] == "x")
  assert trainable == {"a": {"x": bank["a"]["x"]}}
  assert set(frozen) == {"a", "b"} and set(frozen["a"]) == {"y"}
  merged = merge_params(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(bank)
  with pytest.raises(ValueError, match="both parts"):
    merge_params(bank, bank)


def test_frozen_encoder_does_not_move(tmp_path):
  cfg = micro_config(tmp_path, train__num_steps=6, mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  vocab_size = experiment.build_vocabulary(cfg).vocab_size
  model = T5(experiment.model_config(cfg, vocab_size))
  assert model.config.d_model == get_preset("micro").d_model
  bank = jax.device_get(model.init(jax.random.key(3)))
  trainable, frozen = partition_params(bank, lambda path: path[0] != "encoder")
  base = losses.task_loss(model, model.identity_plan())

  def loss_fn(params, frozen_part, batch, rng, step):
    return base(merge_params(params, frozen_part), {}, batch, rng, step)

  result = train(cfg, loss_fn=loss_fn, init_params=trainable, frozen=frozen, model=model)
  assert "encoder" not in result.state.params
  assert "encoder" not in str(jax.tree_util.tree_structure(result.state.opt_state))
  wi = result.frozen["encoder"]["blocks"]["0"]["ffn"]["wi"]["kernel"]
  assert len(wi.sharding.device_set) == 8  # sharded like a trainable parameter, not replicated
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), result.frozen, frozen)
  moved = result.state.params["decoder"]["blocks"]["0"]["ffn"]["wi"]["kernel"]
  assert np.abs(np.asarray(moved) - bank["decoder"]["blocks"]["0"]["ffn"]["wi"]["kernel"]).max() > 0
  assert result.losses[6] < result.losses[1]
