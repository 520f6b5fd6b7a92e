"""Fine-tuning starts from a Hugging Face checkpoint: the first step's loss is the imported
model's loss on the first batch, and the imported weights are what the optimizer updates."""

import dataclasses

import jax
import numpy as np
from train_helpers import micro_config

from modjax.core.presets import get_preset
from modjax.models import T5
from modjax.store import hf
from modjax.train import experiment, losses
from modjax.train.loop import train


def test_training_starts_from_the_imported_checkpoint(tmp_path):
  config = dataclasses.replace(get_preset("micro"), vocab_size=256)
  model = T5(config)
  bank = jax.device_get(model.init(jax.random.key(7)))
  hf_dir = hf.export_checkpoint(config, bank, str(tmp_path / "hf"))

  cfg = micro_config(tmp_path / "run", train__num_steps=2, mesh__num_devices=1)
  cfg.model.init_from = hf_dir
  result = train(cfg)

  vocabulary = experiment.build_vocabulary(cfg)
  task = experiment.build_task(cfg, vocabulary)
  first = next(experiment.train_batches(cfg, model, task, 0))
  total, weight = losses.task_loss(model, model.identity_plan())(bank, {}, first, None)
  np.testing.assert_allclose(result.losses[1], float(total / weight), rtol=1e-5)
  moved = result.state.params["decoder"]["blocks"]["1"]["ffn"]["wo"]["kernel"]
  original = bank["decoder"]["blocks"]["1"]["ffn"]["wo"]["kernel"]
  assert 0 < np.abs(np.asarray(moved) - original).max() < 0.1  # updated, starting from the import
