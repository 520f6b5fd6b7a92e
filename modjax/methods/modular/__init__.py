"""Modular Transformers (Zhou, Le Bras, Choi, 2023): one bank of modularized layers trained
once, assembled into models of many sizes.

No code of the paper was published; the reconstructed choices are parameters with defaults:
module init (``add_modules(init="first")``: a copy of the span's first layer), the curriculum
(:class:`Curriculum`: coarse-to-fine stages, then uniform; p ramping linearly from 0.5 to 1) and
the loss weights and KD temperature (:class:`LossWeights`, all 1.0).

* :mod:`.modules`: granularities, module entries ``m{g}.{j}`` with span metadata, and the split
  of a bank into trainable modules and the frozen teacher;
* :mod:`.assembly`: plans from per-stack tilings (original layers and aligned modules);
* :mod:`.replacing`: the multi-grained replacing forward (``lax.switch`` over granularities,
  ``lax.cond`` per slot) and its curriculum;
* :mod:`.losses`: the step-contract loss (CE, logits KD, hidden MSE, attention KL).
"""

from modjax.methods.modular.assembly import all_g_plan, tiling_plan
from modjax.methods.modular.losses import LossWeights, logits_kd, modular_loss, teacher_outputs
from modjax.methods.modular.modules import (
  ModularError,
  add_modules,
  bank_granularities,
  check_granularities,
  default_granularities,
  module_name,
  num_layers,
  resolve_granularities,
  split_trainable,
)
from modjax.methods.modular.replacing import (
  Curriculum,
  StackChoice,
  draw_choices,
  fixed_choice,
  replacing_forward,
)

__all__ = [
  "Curriculum",
  "LossWeights",
  "ModularError",
  "StackChoice",
  "add_modules",
  "all_g_plan",
  "bank_granularities",
  "check_granularities",
  "default_granularities",
  "draw_choices",
  "fixed_choice",
  "logits_kd",
  "modular_loss",
  "module_name",
  "num_layers",
  "replacing_forward",
  "resolve_granularities",
  "split_trainable",
  "teacher_outputs",
  "tiling_plan",
]
