"""The vanilla GPT-2 baselines a MoM decoder is compared with, and the budgets that make the
comparison fair (DESIGN.md, "Comparing a method with its baselines").

``mom.baseline`` (``configs/mom_gpt2.py``) trains one of them instead of the MoM decoder, with
the same data, vocabulary, optimizer and starting point:

* ``vanilla``: the GPT-2 whose layers the pools stand for (``MoMConfig.vanilla_depth`` layers
  from scratch, the original itself in phase two): the MoM's parameters without its routers;
* ``wider_ffn``: that GPT-2 with every FFN widened so its parameters equal the MoM's, routers
  included: ``d_ff`` is solved from the counts (:func:`param_matched_config`; the nearest
  multiple of 64 when that stays within :data:`PARAM_TOLERANCE`, else the nearest integer);
* ``extra_layer``: that GPT-2 with the routers' parameters as whole extra layers (rounded to the
  nearest layer; an error when that rounds to none).

In phase two (``mom.init_from``) a wider or deeper baseline grows from the original
(:func:`grow`): the new FFN columns and the new layers start so that the grown model computes
exactly what the original does (new output rows and output projections zero), so the control
starts where MoM starts.

Equal compute: ``python -m modjax.methods.mom.baselines --config configs/mom_gpt2.py:ddtp,<data>``
prints, for the config's MoM and each baseline, the parameters, the training FLOPs per step
(:mod:`.cost`: 3 x forward) and how many steps of each spend what ``train.num_steps`` MoM steps
do; ``--match=wider_ffn`` prints only that step count (for scripts).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from modjax.core.model_config import GPT2Config
from modjax.methods.mom import cost
from modjax.methods.mom.model import MoMGPT2
from modjax.methods.mom.pools import init_routers
from modjax.methods.mom.structure import MoMConfig, MoMError
from modjax.models import GPT2

BASELINES = ("vanilla", "wider_ffn", "extra_layer")
PARAM_TOLERANCE = 0.005  # |baseline - MoM| / MoM parameters a param-matched baseline may miss by
D_FF_MULTIPLE = 64


def count_params(model) -> int:
  """Parameters of ``model.init`` (shapes only, nothing is allocated)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def router_params(structure: MoMConfig, d_model: int) -> int:
  shapes = jax.eval_shape(lambda: init_routers(structure, jax.random.key(0), d_model))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def param_matched_config(kind: str, structure: MoMConfig, vanilla: GPT2Config, target: int):
  """The GPT-2 config of baseline ``kind`` grown from ``vanilla`` to ``target`` parameters (the
  MoM's). ``vanilla`` is returned as it is for ``kind="vanilla"``."""
  if kind not in BASELINES:
    raise MoMError(f"mom.baseline={kind!r} is invalid: choose one of {BASELINES} (or '')")
  if kind == "vanilla":
    return vanilla
  base = count_params(GPT2(vanilla))
  missing = target - base
  if kind == "wider_ffn":
    wider = dataclasses.replace(vanilla, n_inner=vanilla.d_ff + 1)
    per_unit = count_params(GPT2(wider)) - base
    exact = vanilla.d_ff + round(missing / per_unit)
    aligned = D_FF_MULTIPLE * round(exact / D_FF_MULTIPLE)
    miss = abs(base + (aligned - vanilla.d_ff) * per_unit - target) / target
    d_ff = aligned if miss <= PARAM_TOLERANCE else exact
    grown = dataclasses.replace(vanilla, n_inner=d_ff)
    growth = d_ff - vanilla.d_ff
  else:
    deeper = dataclasses.replace(vanilla, n_layer=vanilla.n_layer + 1)
    per_layer = count_params(GPT2(deeper)) - base
    growth = round(missing / per_layer)
    grown = dataclasses.replace(vanilla, n_layer=vanilla.n_layer + growth)
  if growth <= 0:
    raise MoMError(
      f"mom.baseline={kind!r}: the MoM has {missing:+,} parameters beside the vanilla model's "
      f"{base:,}, which is no {'FFN width' if kind == 'wider_ffn' else 'whole layer'} to add; "
      "use another baseline (wider_ffn adds the least)"
    )
  return grown


def baseline_model(kind: str, mom: MoMGPT2) -> GPT2:
  """Baseline ``kind`` for the MoM decoder ``mom`` (whose ``config`` is its vanilla GPT-2)."""
  return GPT2(param_matched_config(kind, mom.mom, mom.config, count_params(mom)))


def grow(vanilla_params, source: GPT2Config, target: GPT2Config, rng):
  """``vanilla_params`` (a ``source`` GPT-2) as a ``target`` GPT-2 of wider FFNs and/or more
  layers that computes exactly the same function: new ``wi`` columns are fresh (bias 0) and their
  ``wo`` rows zero; new top layers are fresh with zero attention and FFN output projections."""
  fresh = GPT2(target).init(rng)
  blocks = {}
  for name, new_block in fresh["decoder"]["blocks"].items():
    old_block = vanilla_params["decoder"]["blocks"].get(name)
    if int(name) >= source.n_layer or old_block is None:
      blocks[name] = _silent(new_block)
    else:
      blocks[name] = {**old_block, "ffn": _widened(old_block["ffn"], new_block["ffn"])}
  decoder = {**vanilla_params["decoder"], "blocks": blocks}
  return {**vanilla_params, "decoder": decoder}


def _widened(old, new):
  width = old["wi"]["kernel"].shape[-1]
  if new["wi"]["kernel"].shape[-1] == width:
    return old
  wi_kernel = jnp.concatenate([old["wi"]["kernel"], new["wi"]["kernel"][:, width:]], axis=-1)
  wi_bias = jnp.concatenate([old["wi"]["bias"], jnp.zeros_like(new["wi"]["bias"][width:])])
  wo_new = jnp.zeros_like(new["wo"]["kernel"][width:])
  wo_kernel = jnp.concatenate([old["wo"]["kernel"], wo_new], axis=0)
  return {"wi": {"kernel": wi_kernel, "bias": wi_bias}, "wo": {**old["wo"], "kernel": wo_kernel}}


def _silent(block):
  """A fresh block whose residual branches add nothing (zero output projections)."""
  attn, ffn = block["self_attn"], block["ffn"]
  zero = lambda layer: jax.tree.map(jnp.zeros_like, layer)  # noqa: E731
  return {
    **block,
    "self_attn": {**attn, "out": zero(attn["out"])},
    "ffn": {**ffn, "wo": zero(ffn["wo"])},
  }


def budget(mom: MoMGPT2, steps: int, batch: int, length: int) -> dict:
  """Parameters and training FLOPs of ``mom`` and of every baseline, and the steps each
  baseline needs to spend what ``steps`` MoM steps do."""
  mom_flops = cost.training_flops_per_step(mom, batch, length)
  rows = {"mom": _row(mom, steps, mom_flops, steps)}
  for kind in BASELINES:
    try:
      model = baseline_model(kind, mom)
    except MoMError as e:
      rows[kind] = {"unavailable": str(e)}
      continue
    flops = cost.training_flops_per_step(model, batch, length)
    rows[kind] = _row(model, steps, flops, cost.matching_steps(steps, mom_flops, flops))
  return {"batch": batch, "length": length, "mom_steps": steps, "runs": rows}


def _row(model, steps: int, flops_per_step: int, matching: int) -> dict:
  c = model.config
  return {
    "params": count_params(model),
    "n_layer": c.n_layer,
    "d_ff": c.d_ff,
    "training_flops_per_step": flops_per_step,
    "training_flops_at_mom_steps": flops_per_step * steps,
    "steps_for_mom_flops": matching,
  }


def main(config) -> None:
  from absl import flags

  from modjax.methods.mom.run import mom_model_for_config
  from modjax.train.experiment import ConfigError

  match = flags.FLAGS.match
  t = config.train
  mom = mom_model_for_config(config)
  report = budget(mom, t.num_steps, t.batch_size, config.data.targets_length)
  if not match:
    print(json.dumps(report, indent=1))
    return
  row = report["runs"].get(match)
  if row is None or "unavailable" in row:
    why = row["unavailable"] if row else f"choose one of {BASELINES}"
    raise ConfigError(f"--match={match}: {why}")
  print(row["steps_for_mom_flops"])


if __name__ == "__main__":
  from absl import flags

  from modjax.core import cli

  flags.DEFINE_string("match", "", "Print only the steps of this baseline that match MoM's FLOPs.")
  cli.run(main)
