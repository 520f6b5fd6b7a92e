"""Modular Transformers: one module bank distilled from a trained T5 teacher by multi-grained
module replacing. The arg is ``<teacher recipe>[,<teacher dir>[,<data dir>]]``:

* ``tiny``: the embedded quickstart; the teacher is configs/tiny.py's run (default runs/tiny).
* ``ddtp_summ``: the 6+6-layer DDTP-summ teacher of configs/ddtp_summ.py:<data>,6 (default
  runs/ddtp_summ6, data ../shared/data/ddtp-summ).

  python -m modjax.train --config configs/tiny.py --config.workdir=runs/tiny
  python -m modjax.train --config configs/modular_t5.py:tiny,runs/tiny --config.workdir=runs/tiny_bank

The data, vocabulary and batch settings are the teacher recipe's; the bank trains only the
modules (see modjax/methods/modular/config.py for every value and which are reconstructions).
"""

from modjax.train.defaults import lock, sibling_config, with_method

RECIPES = {"tiny": ("tiny.py", "runs/tiny"), "ddtp_summ": ("ddtp_summ.py", "runs/ddtp_summ6")}


def recipe_config(file_name: str, arg: str):
  return sibling_config(__file__, file_name, arg)


def get_config(arg: str = "tiny"):
  recipe, teacher, data_dir = (arg.split(",") + ["", ""])[:3]
  if recipe not in RECIPES:
    raise ValueError(f"unknown teacher recipe {recipe!r}; use one of {sorted(RECIPES)}")
  file_name, default_teacher = RECIPES[recipe]
  c = recipe_config(file_name, data_dir)
  with_method(c, "modular")
  c.modular.teacher = teacher or default_teacher
  c.optimizer.learning_rate = 0.005  # modules start from teacher layers: a gentler step (R)
  c.optimizer.warmup_steps = 50
  if recipe == "tiny":
    c.train.num_steps = 300
    c.checkpoint.every_steps = 100
  return lock(c)
