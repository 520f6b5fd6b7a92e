"""The ``modular`` section of a run config, and how it becomes the method's objects.

Every value marked (R) is a reconstruction: the paper published no code. Defaults:

* ``teacher``: the fine-tuned teacher, a training workdir or a saved bank directory (required);
* ``granularities``: ``""`` = the divisors of L between 2 and 6, or e.g. ``"2,3,6"``; per
  stack as ``"decoder:2,3,6"`` (a decoder-only bank) or ``"encoder:2;decoder:2,3"``;
* ``init`` (R): ``"first"`` copies the first original layer of a module's span (``"mean"``: the
  span's average);
* curriculum (R): ``p`` ramps linearly from ``p_start`` 0.5 to ``p_end`` 1.0 over
  ``ramp_fraction`` of the run; the first ``staged_fraction`` (0.5) of the run goes through the
  granularities coarse to fine (``order``), then all are equally likely;
* loss weights (R): ``ce`` 1, ``kd`` 1 (temperature 1), ``hidden`` 1, ``attn`` 1;
  ``hidden_form`` (R) ``raw``: the hidden term is the MSE of the raw states (``normalized``:
  of unit-RMS states; ``cosine``: one minus their cosine);
* ``remat``: each replacing branch under ``jax.checkpoint`` (saves memory and, on CPU, time).
"""

from __future__ import annotations

import ml_collections

from modjax.methods.modular.losses import LossWeights
from modjax.methods.modular.modules import ModularError
from modjax.methods.modular.replacing import Curriculum


def add_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the ``modular`` section (unlocked config) and sets ``c.method = "modular"``."""
  c.method = "modular"
  m = c.modular = ml_collections.ConfigDict()
  m.teacher = ""
  m.granularities = ""
  m.init = "first"
  m.p_start = 0.5
  m.p_end = 1.0
  m.ramp_fraction = 1.0
  m.order = "coarse_to_fine"
  m.staged_fraction = 0.5
  m.ce = 1.0
  m.kd = 1.0
  m.temperature = 1.0
  m.hidden = 1.0
  m.attn = 1.0
  m.hidden_form = "raw"
  m.remat = True
  return c


def granularities(cfg) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
  """``""``: the defaults of every stack; ``"2,3,6"``: these in every stack;
  ``"decoder:2,3,6"`` or ``"encoder:2;decoder:2,3"``: per stack, and a stack left out gets no
  modules (a decoder-only bank runs the teacher's encoder in every plan)."""
  text = cfg.modular.granularities.replace(" ", "")
  if not text:
    return None
  try:
    if ":" not in text:
      return _ints(text)
    per_stack = {}
    for part in filter(None, text.split(";")):
      stack, _, values = part.partition(":")
      if not stack or stack in per_stack:
        raise ValueError(part)
      per_stack[stack] = _ints(values)
    return per_stack
  except ValueError as e:
    raise ModularError(
      f"config.modular.granularities={cfg.modular.granularities!r} is invalid: write divisors "
      "of L, e.g. '2,3,6' (every stack) or 'decoder:2,3,6' / 'encoder:2;decoder:2,3' (per stack)"
    ) from e


def _ints(text: str) -> tuple[int, ...]:
  values = tuple(int(g) for g in text.split(","))
  if not values:
    raise ValueError(text)
  return values


def curriculum(cfg) -> Curriculum:
  m = cfg.modular
  return Curriculum(
    num_steps=cfg.train.num_steps,
    p_start=m.p_start,
    p_end=m.p_end,
    ramp_fraction=m.ramp_fraction,
    order=m.order,
    staged_fraction=m.staged_fraction,
  )


def loss_weights(cfg) -> LossWeights:
  m = cfg.modular
  return LossWeights(
    ce=m.ce, kd=m.kd, temperature=m.temperature, hidden=m.hidden, attn=m.attn,
    hidden_form=m.hidden_form,
  )  # fmt: skip
