"""Optimizers and learning-rate schedules from a config (optax).

Global-norm clipping and Adafactor are optax's (same state pytrees, same updates to float
rounding: tests/test_optim.py checks both against optax), computed with fewer passes over the
parameters. On CPU, where a step of t5-small's 60M parameters is memory-bound, optax's versions
wrote several parameter-sized temporaries per step that XLA did not fuse away: the clipped
gradients (a divide, which XLA will not recompute in each consumer), and in Adafactor's
parameter scale a ``where`` copy of every parameter and a second reduction over it
(``optax.safe_root_mean_squares`` guards a gradient the optimizer never takes).

:func:`make_optimizer` takes these rewrites where ``modjax.core.cpu_kernels`` says so (XLA:CPU by
default) and otherwise the public ``optax.clip_by_global_norm`` and ``optax.adafactor`` (through
:func:`optax_adafactor`, the same settings), which initialise the rewrites' state too: a checkpoint
resumes on either path. Nothing here imports optax's private modules; the two rules the rewrite
shares with optax's ``scale_by_factored_rms`` are restated below and checked against optax by the
tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from modjax.core.cpu_kernels import use_cpu_kernels
from modjax.core.errors import UserError

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("constant", "rsqrt", "cosine", "linear")


class OptimizerConfigError(UserError, ValueError):
  """An optimizer or schedule setting that cannot be built."""


def make_schedule(name: str, learning_rate: float, warmup_steps: int, total_steps: int):
  """Linear warm-up, then: constant; T5's ``lr * rsqrt(max(step, warmup))`` shape; cosine or
  linear decay to zero at ``total_steps``."""
  if name not in SCHEDULES:
    raise OptimizerConfigError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
  if learning_rate <= 0:
    raise OptimizerConfigError(f"learning_rate must be positive, got {learning_rate}")
  if warmup_steps < 0:
    raise OptimizerConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
  warm = max(warmup_steps, 1)
  warmup = optax.linear_schedule(learning_rate / warm, learning_rate, warm)
  decay_steps = max(total_steps - warm, 1)
  if name == "constant":
    after = optax.constant_schedule(learning_rate)
  elif name == "rsqrt":
    after = lambda step: learning_rate * (warm / (step + warm)) ** 0.5  # noqa: E731
  elif name == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps)
  else:
    after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
  return optax.join_schedules([warmup, after], [warm]) if warmup_steps else after


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, object]:
  """(optimizer, schedule) from ``cfg`` (the config's ``optimizer`` section).

  A section with ``schedule_start`` S and ``schedule_steps`` N (configs/mom_gpt2.py adds them)
  continues a schedule: step s of this run takes the rate of step S + s of a schedule of N
  steps (0: S + ``total_steps``), so a run that goes on from another's weights keeps that run's
  learning rate instead of warming up again."""
  start, horizon = cfg.get("schedule_start", 0), cfg.get("schedule_steps", 0)
  if start < 0 or horizon < 0:
    raise OptimizerConfigError(
      f"schedule_start={start} and schedule_steps={horizon} must be >= 0 (0: no offset; 0: the "
      "run's own length)"
    )
  base = make_schedule(
    cfg.schedule, cfg.learning_rate, cfg.warmup_steps, horizon or start + total_steps
  )
  schedule = (lambda step: base(step + start)) if start else base
  rewrites = use_cpu_kernels()
  if cfg.name == "adafactor":
    core = (adafactor if rewrites else optax_adafactor)(
      learning_rate=schedule,
      decay_rate=cfg.adafactor_decay_rate,
      multiply_by_parameter_scale=cfg.adafactor_parameter_scale,
      clipping_threshold=cfg.get("adafactor_clipping", 0.0) or None,
      weight_decay_rate=cfg.weight_decay or None,
    )
  elif cfg.name == "adamw":
    core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  else:
    raise OptimizerConfigError(f"unknown optimizer {cfg.name!r}; choose one of {OPTIMIZERS}")
  clip = clip_by_global_norm if rewrites else optax.clip_by_global_norm
  chain = [clip(cfg.grad_clip)] if cfg.grad_clip else []
  return optax.chain(*chain, core), schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm(max_norm)`` that scales by a multiply XLA fuses into the
  optimizer's update instead of a divide it writes out (within one rounding of optax's)."""
  reference = optax.clip_by_global_norm(max_norm)

  def update_fn(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformation(reference.init, update_fn)


def _scaled_update(update, p, lr, clipping_threshold, multiply_by_parameter_scale, weight_decay):
  """The tail of optax's adafactor chain on one leaf: update clipping, the learning rate, the
  parameter scale and weight decay (the sign is applied by the caller)."""
  if clipping_threshold is not None:  # optax.clip_by_block_rms: the update's RMS at most this
    update = update / jnp.maximum(1.0, jnp.sqrt(jnp.mean(jnp.square(update))) / clipping_threshold)
  update = update * lr
  if multiply_by_parameter_scale:  # max(rms(p), 1e-3), as optax.safe_root_mean_squares
    update = update * jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(p))), 1e-3)
  if weight_decay is not None:
    update = update + weight_decay * p
  return update


def optax_adafactor(
  learning_rate,
  decay_rate: float = 0.8,
  multiply_by_parameter_scale: bool = True,
  weight_decay_rate: float | None = None,
  eps: float = 1e-30,
  min_dim_size_to_factor: int = 128,
  clipping_threshold: float | None = None,
) -> optax.GradientTransformation:
  """The public ``optax.adafactor`` as modjax configures it: no momentum, and by default no
  update clipping (optax's default clips each update's RMS at 1.0; modjax clips the gradients'
  global norm instead): ``clipping_threshold`` turns it on."""
  return optax.adafactor(
    learning_rate=learning_rate,
    decay_rate=decay_rate,
    clipping_threshold=clipping_threshold,
    momentum=None,
    multiply_by_parameter_scale=multiply_by_parameter_scale,
    weight_decay_rate=weight_decay_rate,
    eps=eps,
    min_dim_size_to_factor=min_dim_size_to_factor,
  )


def adafactor(
  learning_rate,
  decay_rate: float = 0.8,
  multiply_by_parameter_scale: bool = True,
  weight_decay_rate: float | None = None,
  eps: float = 1e-30,
  min_dim_size_to_factor: int = 128,
  clipping_threshold: float | None = None,
) -> optax.GradientTransformation:
  """:func:`optax_adafactor`'s updates with every leaf's update computed in one function.

  The state is optax's (initialised by optax): (FactoredState, EmptyState of the update
  clipping when it is on, ScaleByScheduleState or EmptyState for a constant rate, EmptyState
  per remaining link of optax's chain).
  """
  reference = optax_adafactor(
    learning_rate,
    decay_rate,
    multiply_by_parameter_scale,
    weight_decay_rate,
    eps,
    min_dim_size_to_factor,
    clipping_threshold,
  )
  clip_states = 0 if clipping_threshold is None else 1

  def update_fn(grads, state, params):
    if params is None:
      raise ValueError("adafactor needs the parameters (multiply_by_parameter_scale)")
    factored, clip_state, (lr_state, *rest) = (
      state[0],
      state[1 : 1 + clip_states],
      state[1 + clip_states :],
    )
    decay = _decay_rate_pow(factored.count, decay_rate)
    if callable(learning_rate):
      lr, lr_state = (
        learning_rate(lr_state.count),
        lr_state._replace(count=optax.safe_increment(lr_state.count)),
      )
    else:
      lr = learning_rate

    def leaf(g, v_row, v_col, v, p):
      dims = _factored_dims(g.shape, min_dim_size_to_factor)
      update, new_row, new_col, new_v = _adafactor_leaf(g, v_row, v_col, v, decay, eps, dims)
      scale = (clipping_threshold, multiply_by_parameter_scale, weight_decay_rate)
      return -_scaled_update(update, p, lr, *scale), new_row, new_col, new_v

    out = jax.tree.map(leaf, grads, factored.v_row, factored.v_col, factored.v, params)
    parts = [jax.tree.map(lambda o, i=i: o[i], out, is_leaf=_is_quad) for i in range(4)]
    factored = factored._replace(
      count=optax.safe_increment(factored.count), v_row=parts[1], v_col=parts[2], v=parts[3]
    )
    return parts[0], (factored, *clip_state, lr_state, *rest)

  return optax.GradientTransformation(reference.init, update_fn)


def _decay_rate_pow(count, exponent: float):
  """Adafactor's second-moment decay at step ``count``: ``1 - (count + 1)**-exponent``."""
  return 1.0 - jnp.asarray(count + 1, jnp.float32) ** (-exponent)


def _factored_dims(shape: tuple[int, ...], min_dim_size_to_factor: int) -> tuple[int, int] | None:
  """The (second largest, largest) axes over which the second moment is factored; None for
  fewer than two axes or a second largest axis under ``min_dim_size_to_factor``."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def _is_quad(x) -> bool:
  return isinstance(x, tuple) and len(x) == 4


def _adafactor_leaf(g, v_row, v_col, v, decay, eps, dims):
  """(scaled gradient, v_row, v_col, v) of one leaf: optax's scale_by_factored_rms.

  ``mean(g**2 + eps)`` is taken as ``mean(g**2) + eps`` (equal to rounding) so that no
  parameter-sized ``g**2 + eps`` is written for the two reductions to read; the unused slots
  (optax's ``zeros((1,))``) pass through.
  """
  dtype = g.dtype
  if dims is None:
    new_v = (decay * v + (1.0 - decay) * (jnp.square(g) + eps)).astype(dtype)
    return g * new_v**-0.5, v_row, v_col, new_v
  d1, d0 = dims
  row_mean_sq = jnp.mean(jnp.square(g), axis=d0) + eps
  col_mean_sq = jnp.mean(jnp.square(g), axis=d1) + eps
  new_row = (decay * v_row + (1.0 - decay) * row_mean_sq).astype(dtype)
  new_col = (decay * v_col + (1.0 - decay) * col_mean_sq).astype(dtype)
  reduced_d1 = d1 - 1 if d1 > d0 else d1
  row_factor = (new_row / jnp.mean(new_row, axis=reduced_d1, keepdims=True)) ** -0.5
  col_factor = new_col**-0.5
  update = g * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
  return update, new_row, new_col, v
