"""Multi-grained module replacing: the training forward of Modular Transformers.

Each step, per stack, one granularity g is drawn from a curriculum, and each slot j of g (the
original layers ``[j*g, (j+1)*g)``) is run either by module ``m{g}.{j}`` or by the frozen
teacher's layers of its span, by a scalar Bernoulli(p) decision per slot per step. Both choices
live inside the one jitted step: ``jax.lax.switch`` on the drawn granularity index, and inside
it one ``jax.lax.cond`` per slot. A decision is never per example: under ``vmap`` a cond becomes
a select and both branches run. So the whole curriculum (every stage, every p) compiles once.

Both branches of a slot return the same structure: the span's output hidden state and its last
layer's self-attention probabilities (and cross-attention for the decoder). The teacher branch
passes gradients through the frozen layers to earlier modules; the layers themselves get no
update because they are in the step's ``frozen`` part.

Under ``jax.grad`` XLA keeps the residuals of BOTH branches of a cond (the untaken one as
zeros), so a step taking the module can cost about as much as one taking the span; with
``remat=True`` (the default) each branch is wrapped in ``jax.checkpoint`` and saves only its
inputs, trading a second forward of the taken branch during the backward pass for that memory
and traffic. Measured on XLA:CPU (jax 0.10.2; d_model 256, 4 + 4 layers, 16 x 64 tokens, the
teacher forward and KD included): the step's temporary memory goes from 126 MiB without remat to
54 MiB with it, against 89-105 MiB for a plain step of the same tiling with no cond, at about the
same step time (within the run-to-run noise of a shared 2-core machine, roughly +-10%).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from modjax.methods.modular.modules import ModularError, module_name
from modjax.models.stack import run_stack, slot_params
from modjax.nn.layers import Block

ORDERS = ("coarse_to_fine", "fine_to_coarse", "cumulative", "uniform")


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """When which granularity is drawn and how often a slot is replaced (all reconstructions).

  * ``p``: the replacement probability ramps linearly from ``p_start`` to ``p_end`` over the
    first ``ramp_fraction`` of ``num_steps`` (BERT-of-Theseus style), then stays at ``p_end``.
  * granularities: the first ``staged_fraction`` of training is split into K equal stages, one
    per granularity. ``order="coarse_to_fine"`` draws only the k-th coarsest in stage k;
    ``"fine_to_coarse"`` the k-th finest; ``"cumulative"`` draws uniformly among the k
    coarsest; ``"uniform"`` ignores the stages. After the stages every granularity is equally
    likely.
  """

  num_steps: int
  p_start: float = 0.5
  p_end: float = 1.0
  ramp_fraction: float = 1.0
  order: str = "coarse_to_fine"
  staged_fraction: float = 0.5

  def __post_init__(self):
    if not isinstance(self.num_steps, int) or self.num_steps < 1:
      raise ModularError(f"curriculum num_steps must be a positive integer, got {self.num_steps!r}")
    for name in ("p_start", "p_end", "ramp_fraction", "staged_fraction"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ModularError(f"curriculum {name} must lie in [0, 1], got {value!r}")
    if self.order not in ORDERS:
      raise ModularError(f"curriculum order {self.order!r} is unknown; use one of {ORDERS}")

  def p(self, step):
    """Replacement probability at ``step`` (traced or not)."""
    ramp = max(self.ramp_fraction * self.num_steps, 1e-9)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / ramp, 0.0, 1.0)
    return self.p_start + (self.p_end - self.p_start) * t

  def stage_table(self, num_granularities: int) -> np.ndarray:
    """[K + 1, K] probabilities over granularities sorted ascending: row k < K is stage k,
    row K is the uniform tail."""
    k = num_granularities
    table = np.full((k + 1, k), 1.0 / k)
    for stage in range(k):
      coarsest = np.arange(k - 1, k - 2 - stage, -1)  # indices of the stage+1 coarsest
      row = np.zeros(k)
      if self.order == "coarse_to_fine":
        row[k - 1 - stage] = 1.0
      elif self.order == "fine_to_coarse":
        row[stage] = 1.0
      elif self.order == "cumulative":
        row[coarsest] = 1.0 / len(coarsest)
      else:
        row[:] = 1.0 / k
      table[stage] = row
    return table

  def granularity_probs(self, step, num_granularities: int):
    """Probabilities over the stack's granularities (ascending) at ``step``."""
    k = num_granularities
    table = jnp.asarray(self.stage_table(k), jnp.float32)
    stage_len = self.staged_fraction * self.num_steps / k
    if stage_len <= 0:
      return table[k]
    stage = jnp.floor(jnp.asarray(step, jnp.float32) / stage_len).astype(jnp.int32)
    return table[jnp.clip(stage, 0, k)]

  def expected_updates(self, num_granularities: int) -> np.ndarray:
    """[K] expected number of steps in which one module of each granularity (ascending) is in
    the replaced configuration, i.e. receives a gradient: the sum over steps of
    P(its granularity is drawn) x p."""
    steps = np.arange(self.num_steps)
    probs_SK = np.asarray(self.granularity_probs(steps, num_granularities))
    return (probs_SK * np.asarray(self.p(steps))[:, None]).sum(axis=0)


class StackChoice(NamedTuple):
  """One step's decisions for a stack: ``index`` into its granularities (ascending, int32
  scalar) and ``replace``, one bool per slot of the finest granularity (slot j of a coarser g
  reads entry j)."""

  index: jax.Array
  replace: jax.Array


def fixed_choice(granularities, layers: int, granularity: int, replace=True) -> StackChoice:
  """A given decision (tests, evaluation): ``replace`` is one bool for every slot or a list."""
  if granularity not in granularities:
    raise ModularError(f"granularity {granularity} is not among {list(granularities)}")
  slots = layers // min(granularities)
  flags = np.zeros(slots, bool)
  count = layers // granularity
  flags[:count] = np.broadcast_to(np.asarray(replace, bool), (count,))
  return StackChoice(jnp.int32(list(granularities).index(granularity)), jnp.asarray(flags))


def draw_choices(rng, step, curriculum: Curriculum, granularities: Mapping, layers: Mapping):
  """``({stack: StackChoice}, p)``: a granularity per stack from the curriculum's distribution
  at ``step`` and one Bernoulli(p) per slot, scalars shared by every example of the batch."""
  p = curriculum.p(step)
  choices = {}
  for i, (stack, gs) in enumerate(sorted(granularities.items())):
    if not gs:
      continue
    g_key, r_key = jax.random.split(jax.random.fold_in(rng, i))
    probs = curriculum.granularity_probs(step, len(gs))
    index = jax.random.categorical(g_key, jnp.log(probs)).astype(jnp.int32)
    replace = jax.random.bernoulli(r_key, p, (layers[stack] // min(gs),))
    choices[stack] = StackChoice(index, replace)
  return choices, p


def _masked_mean(value_BL, mask_BL):
  return jnp.sum(value_BL * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0)


HIDDEN_FORMS = ("raw", "normalized", "cosine")


def hidden_mse(student_BLD, teacher_BLD, mask_BL, form: str = "raw"):
  """Mean over real tokens of the hidden-state distance: ``raw``, the mean squared difference
  over features; ``normalized``, the same after scaling each state to unit RMS over features
  (T5's parameter-free norm: a layer's scale drifts without changing what it says);
  ``cosine``, one minus the cosine similarity."""
  s, t = student_BLD.astype(jnp.float32), teacher_BLD.astype(jnp.float32)
  if form == "cosine":
    dot, norms = jnp.sum(s * t, axis=-1), jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    return _masked_mean(1.0 - dot / jnp.maximum(norms, 1e-6), mask_BL)
  if form == "normalized":
    s, t = (x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) for x in (s, t))
  elif form != "raw":
    raise ModularError(f"unknown hidden-loss form {form!r}; choose one of {HIDDEN_FORMS}")
  return _masked_mean(jnp.mean(jnp.square(s - t), axis=-1), mask_BL)


def attention_kl(student_BHLT, teacher_BHLT, mask_BL):
  """KL(teacher || student) over keys, averaged over heads and real query positions. Masked keys
  have probability 0 in both and add nothing."""
  tiny = jnp.finfo(jnp.float32).tiny
  t, s = teacher_BHLT.astype(jnp.float32), student_BHLT.astype(jnp.float32)
  terms = jnp.where(t > 0, t * (jnp.log(jnp.maximum(t, tiny)) - jnp.log(jnp.maximum(s, tiny))), 0)
  return _masked_mean(jnp.mean(jnp.sum(terms, axis=-1), axis=1), mask_BL)


def span_losses(out, targets, last: int, mask_BL, hidden_form: str = "raw"):
  """(hidden distance, attention KL) of a span's outputs ``(x, self_probs, cross_probs)``
  against the teacher's intermediates at the span's last layer ``last``."""
  x, self_probs, cross_probs = out
  hidden = hidden_mse(x, targets["hidden"][last], mask_BL, hidden_form)
  attn = attention_kl(self_probs, targets["self_attn"][last], mask_BL)
  if cross_probs is not None:
    attn = attn + attention_kl(cross_probs, targets["cross_attn"][last], mask_BL)
  return hidden, attn


def stack_runner(
  granularities,
  choice: StackChoice,
  targets=None,
  mask_BL=None,
  *,
  remat: bool = True,
  hidden_form: str = "raw",
):
  """A ``run_stack`` replacement (see ``T5.encode``'s ``stack_fns``) that replaces spans of the
  teacher's slots by modules as ``choice`` says. Returns (x_BLD, stats) where stats holds the
  sums over replaced spans of ``hidden`` and ``attn`` against ``targets`` (the teacher's
  per-layer intermediates; zeros without them; ``hidden_form``: see :func:`hidden_mse`) and
  ``replaced``, the number of replaced spans."""

  def run(
    stack_params,
    slots,
    spec,
    x_BLD,
    self_bias,
    enc_BTD=None,
    cross_bias=None,
    *,
    deterministic=True,
    dropout_rng=None,
    collect=False,
  ):
    del collect  # the stats are what this stack reports
    for g in granularities:
      if len(slots) % g:
        raise ModularError(f"granularity {g} does not divide the plan's {len(slots)} slots")
    apply = _slot_applier(Block(spec), self_bias, enc_BTD, cross_bias, deterministic, dropout_rng)
    stack = _Stack(apply, stack_params, tuple(slots), choice, targets, mask_BL, remat, hidden_form)
    branches = [functools.partial(_granularity_branch, stack, g) for g in granularities]
    return jax.lax.switch(choice.index, branches, x_BLD)

  return run


def _slot_applier(block, self_bias, enc_BTD, cross_bias, deterministic, dropout_rng):
  """``apply(params, x, position)``: one block on ``x``, its dropout keyed by the position."""

  def apply(params, x, position):
    rngs = {}
    if not deterministic and dropout_rng is not None:
      rngs["dropout"] = jax.random.fold_in(dropout_rng, position)
    return block.apply(
      {"params": params},
      x,
      self_bias,
      enc_BTD,
      cross_bias,
      deterministic=deterministic,
      rngs=rngs,
    )

  return apply


@dataclasses.dataclass(frozen=True, eq=False)
class _Stack:
  """What one stack's replacing forward reads (built per trace by :func:`stack_runner`)."""

  apply: Callable
  params: Mapping
  slots: tuple
  choice: StackChoice
  targets: Mapping | None
  mask_BL: object
  remat: bool
  hidden_form: str = "raw"

  def teacher_span(self, first: int, last: int, x):
    out = None
    for i in range(first, last):
      out = self.apply(slot_params(self.params, self.slots[i]), x, i)
      x = out[0]
    return out

  def module(self, g: int, j: int, x):
    return self.apply(self.params["blocks"][module_name(g, j)], x, g * j)


def _granularity_branch(stack: _Stack, g: int, x):
  """The stack at granularity ``g``: span j runs module (g, j) where the choice replaces it,
  else the teacher's g slots (``lax.cond``), with the span's distillation sums."""
  zero = jnp.zeros((), jnp.float32)
  stats = {"hidden": zero, "attn": zero, "replaced": zero}
  for j in range(len(stack.slots) // g):
    first, last = j * g, (j + 1) * g
    take_module = functools.partial(stack.module, g, j)
    take_span = functools.partial(stack.teacher_span, first, last)
    if stack.remat:
      take_module, take_span = jax.checkpoint(take_module), jax.checkpoint(take_span)
    replaced = stack.choice.replace[j]
    out = jax.lax.cond(replaced, take_module, take_span, x)
    flag = replaced.astype(jnp.float32)
    stats["replaced"] = stats["replaced"] + flag
    if stack.targets is not None:
      hidden, attn = span_losses(out, stack.targets, last - 1, stack.mask_BL, stack.hidden_form)
      stats["hidden"] = stats["hidden"] + flag * hidden
      stats["attn"] = stats["attn"] + flag * attn
    x = out[0]
  return x, stats


def _plain_stack(*args, **kwargs):
  return run_stack(*args, **{**kwargs, "collect": False})


def replacing_forward(
  model,
  params,
  plan,
  batch: Mapping,
  choices: Mapping[str, StackChoice],
  granularities: Mapping,
  *,
  teacher=None,
  deterministic: bool = True,
  dropout_rng=None,
  remat: bool = True,
  hidden_form: str = "raw",
):
  """Teacher-forced logits of the bank ``params`` (teacher and modules) with spans of ``plan``
  (the teacher's) replaced per ``choices``, and ``{stack: stats}`` (see :func:`stack_runner`).

  ``batch``: seqio encoder-decoder features. ``teacher``: the teacher's intermediates per
  stack (``model(..., collect=True)``), for the hidden and attention losses."""
  if "encoder" not in model.stacks:
    raise ModularError("module replacing needs an encoder-decoder model (T5)")
  masks = token_masks(model, batch)
  fns = {}
  for stack in model.stacks:
    if stack in choices:
      targets = None if teacher is None else teacher[stack]
      fns[stack] = stack_runner(
        granularities[stack], choices[stack], targets, masks[stack], remat=remat,
        hidden_form=hidden_form,
      )  # fmt: skip
    else:
      fns[stack] = _plain_stack
  logits, stats = model.apply_batch(
    params,
    plan,
    batch,
    deterministic=deterministic,
    dropout_rng=dropout_rng,
    collect=True,
    stack_fns=fns,
  )
  return logits, {s: v for s, v in stats.items() if s in choices}


def token_masks(model, batch: Mapping) -> dict:
  """Float masks of the positions whose hidden states and attention rows count: real encoder
  tokens, and decoder positions that carry a loss."""
  if batch.get("encoder_segment_ids") is not None:
    encoder = batch["encoder_segment_ids"] > 0
  else:
    encoder = batch["encoder_input_tokens"] != model.config.pad_token_id
  decoder = batch["decoder_loss_weights"] > 0
  return {"encoder": encoder.astype(jnp.float32), "decoder": decoder.astype(jnp.float32)}
