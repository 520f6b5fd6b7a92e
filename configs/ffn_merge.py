"""Recovery fine-tuning after FFN merging. The arg is ``<recipe>,<merged bank>[,<data dir>]``:
the recipe is the original's config (its data, vocabulary, lengths and optimizer), the bank is
what ``python -m modjax.merge --out`` wrote.

* ``tiny``: configs/tiny.py (the embedded quickstart task);
* ``lm``: configs/ddtp_lm.py (GPT-2-shaped LM on DDTP-summ descriptions; data dir default
  ../shared/data/ddtp-summ);
* ``ende``: configs/ddtp_ende.py (6+6 T5 on DDTP en->de; default ../shared/data/ddtp-ende).

  python -m modjax.merge --bank runs/ddtp_lm --config configs/ddtp_lm.py --k 2 \\
      --out runs/ddtp_lm_permute2
  python -m modjax.train --config configs/ffn_merge.py:lm,runs/ddtp_lm_permute2 \\
      --config.workdir=runs/ddtp_lm_permute2_rec

Every merged variant (permute, vanilla, drop) gets the same budget: ``train.num_steps`` steps of
``train.batch_size`` at a gentler learning rate than the original's (the weights start trained).
``--config.ffn_merge.scope=merged`` trains only the shared FFN entries.
"""

from modjax.train.defaults import lock, sibling_config, with_method

RECIPES = {"tiny": "tiny.py", "lm": "ddtp_lm.py", "ende": "ddtp_ende.py"}
# (steps, learning rate, warm-up) of the recovery budget per recipe
BUDGETS = {"tiny": (60, 0.003, 10), "lm": (150, 3e-4, 15), "ende": (100, 0.003, 10)}


def get_config(arg: str = "tiny"):
  recipe, merged, data_dir = (arg.split(",") + ["", ""])[:3]
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; use one of {sorted(RECIPES)}")
  if recipe == "tiny" and data_dir:
    raise ValueError("the tiny recipe reads the embedded task; give no data dir")
  c = sibling_config(__file__, RECIPES[recipe], data_dir)
  with_method(c, "ffn_merge")
  c.ffn_merge.bank = merged
  steps, learning_rate, warmup = BUDGETS[recipe]
  c.train.num_steps = steps
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = warmup
  c.checkpoint.every_steps = 50
  return lock(c)
