"""The main job on the embedded default (no downloads, minutes on a laptop CPU): a tiny T5
teacher on the embedded lead-sentence task, ONE Modular Transformers bank distilled from it, a
sweep of assembled plans (table and Pareto plot), and one plan exported as a Hugging Face
checkpoint, with progress throughout.

  python -m modjax.pipeline --config configs/quickstart.py --config.workdir=runs/quickstart

Each stage is a run config of its own (``teacher``: configs/tiny.py; ``bank``:
configs/modular_t5.py:tiny), overridable as ``--config.teacher.train.num_steps=100``; their
workdirs are set under ``workdir``. Stages already done are resumed, not redone.
"""

import ml_collections

from modjax.train.defaults import sibling_config


def _load(name: str, arg: str = ""):
  return sibling_config(__file__, f"{name}.py", arg)


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.workdir = ""
  c.teacher = _load("tiny")
  c.bank = _load("modular_t5", "tiny")
  c.sweep = ml_collections.ConfigDict()
  c.sweep.strategies = "speed-first,size-first"
  c.sweep.min_speedup = 1.05
  c.sweep.max_speedup = 6.0
  c.sweep.quality = "cross_entropy"  # or "rouge" (decodes a sample)
  c.sweep.batch = 1
  c.sweep.input_length = 64
  c.sweep.max_new_tokens = 24
  c.sweep.runs = 3
  c.export_speedup = 2.0  # export the sweep's fastest Pareto plan up to this measured speed-up
  c.lock()
  return c
