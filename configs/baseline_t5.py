"""Baselines for Modular Transformers on the same teacher and data: ``kd`` (a student of copied
teacher layers trained with logits KD), ``sft`` (the same student fine-tuned on the task alone),
``pseudo`` (the same student fine-tuned on the teacher's decoded outputs) and ``drop`` (the
teacher's own layers, no training). The arg is
``<kind>,<teacher recipe>[,<teacher dir>[,<data dir>]]`` (recipes as in configs/modular_t5.py); the
kept layers are ``--config.baseline.decoder_layers`` / ``encoder_layers`` ("" = all).

  python -m modjax.train --config configs/baseline_t5.py:kd,tiny,runs/tiny \\
      --config.baseline.decoder_layers=0,2 --config.workdir=runs/tiny_kd_dec2
  python -m modjax.train --config configs/baseline_t5.py:drop,tiny,runs/tiny \\
      --config.baseline.decoder_layers=0,2 --config.workdir=runs/tiny_drop_dec2

See modjax/methods/modular/baselines.py; each run writes compute.json (training FLOPs).
"""

from modjax.methods.modular.baselines import KINDS
from modjax.train.defaults import lock, sibling_module, with_method


def _modular_recipes():
  return sibling_module(__file__, "modular_t5.py")


def get_config(arg: str = "kd,tiny"):
  kind, recipe, teacher, data_dir = (arg.split(",") + ["", "", ""])[:4]
  if kind not in KINDS:
    raise ValueError(f"unknown baseline {kind!r}; use one of {KINDS}")
  recipes = _modular_recipes()
  if recipe not in recipes.RECIPES:
    raise ValueError(f"unknown teacher recipe {recipe!r}; use one of {sorted(recipes.RECIPES)}")
  file_name, default_teacher = recipes.RECIPES[recipe]
  c = recipes.recipe_config(file_name, data_dir)
  with_method(c, "baseline")
  c.baseline.kind = kind
  c.modular.teacher = teacher or default_teacher
  c.optimizer.learning_rate = 0.005  # students start from teacher layers, as the modules do
  c.optimizer.warmup_steps = 50
  return lock(c)
