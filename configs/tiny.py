"""Tiny T5 on the embedded lead-sentence task: CPU, no downloads, a few minutes.

python -m modjax.train --config configs/tiny.py --config.workdir=/tmp/modjax/tiny
python -m modjax.evaluate --config configs/tiny.py --config.workdir=/tmp/modjax/tiny
"""

from modjax.train.defaults import base_config, lock


def get_config(arg: str = ""):
  del arg
  c = base_config()
  c.model.preset = "tiny"
  c.data.task = "embedded_lead"
  c.data.vocab_size = 240
  c.data.inputs_length = 64
  c.data.targets_length = 24
  c.train.batch_size = 32
  c.train.num_steps = 300
  c.train.log_every = 25
  c.optimizer.name = "adafactor"
  c.optimizer.learning_rate = 0.01
  c.optimizer.warmup_steps = 50
  c.checkpoint.every_steps = 100
  c.eval.max_examples = 100
  c.eval.max_new_tokens = 24
  return lock(c)
