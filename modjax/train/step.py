"""A generic train step: any loss function, a trainable and a frozen part of the parameters.

The step contract: ``loss_fn(params, frozen, batch, rng, step)`` returns ``(loss_sum, weight_sum)``
or ``(loss_sum, weight_sum, aux)``.

* ``step`` is the step number as a traced int32 scalar (the update about to be made, 0-based),
  so a curriculum or a ramp is an ordinary function of it and ONE compiled step serves the
  whole run.
* ``aux`` is a dict of named float scalars (loss terms, a replacement rate, a router load...),
  reported beside the loss in the progress line, TensorBoard and ``metrics/train.jsonl``. With
  microbatches each is averaged over them, so return per-token means, not sums.
* The step differentiates ``loss_sum`` with respect to ``params`` only, so ``frozen`` (a teacher,
  the fixed part of a bank) costs no optimizer memory, and divides by the total weight across
  microbatches and devices, which makes gradient accumulation exact.

Jitted with in/out shardings and a donated state (pjit semantics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from modjax.core import sharding
from modjax.models.bank import merge_params, partition_params  # noqa: F401 (re-exported)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def _split_microbatches(batch, num_microbatches: int):
  """[B, ...] -> [M, B/M, ...] taking rows m, m+M, ... so every device holds part of each."""

  def split(x):
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(
  loss_fn: Callable,
  optimizer: optax.GradientTransformation,
  *,
  num_microbatches: int = 1,
  schedule: Callable | None = None,
):
  """The (unjitted) step ``(state, frozen, batch, rng) -> (state, metrics)`` for a ``loss_fn``
  that follows the step contract (module docstring).

  ``rng`` is the run's base key; the step folds in its step number, so dropout is the same
  whether or not a run was interrupted and resumed.
  """
  grad_fn = jax.value_and_grad(_with_aux(loss_fn), has_aux=True)

  def step_fn(state: TrainState, frozen, batch: Mapping, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    if num_microbatches == 1:
      (loss_sum, (weight, aux)), grads = grad_fn(state.params, frozen, batch, step_rng, state.step)
    else:

      def accumulate(carry, inputs):
        index, micro = inputs
        (loss, (weight, aux)), grad = grad_fn(
          state.params, frozen, micro, jax.random.fold_in(step_rng, index), state.step
        )
        loss_acc, weight_acc, grad_acc = carry
        carry = (loss_acc + loss, weight_acc + weight, jax.tree.map(jnp.add, grad_acc, grad))
        return carry, aux

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      micro = (jnp.arange(num_microbatches), _split_microbatches(batch, num_microbatches))
      (loss_sum, weight, grads), aux = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
      aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), aux)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": loss_sum / denom,
      "tokens": weight,
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
    }
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    metrics.update(aux)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step_fn


RESERVED_METRICS = ("loss", "tokens", "grad_norm", "param_norm", "learning_rate")


def _with_aux(loss_fn: Callable) -> Callable:
  """``loss_fn`` normalised to ``(loss_sum, (weight_sum, aux))`` for ``value_and_grad``."""

  def wrapped(params, frozen, batch, rng, step):
    out = loss_fn(params, frozen, batch, rng, step)
    if not isinstance(out, tuple) or len(out) not in (2, 3):
      raise TypeError(
        "loss_fn must return (loss_sum, weight_sum) or (loss_sum, weight_sum, aux_dict), got "
        f"{type(out).__name__}"
      )
    loss_sum, weight_sum, aux = out if len(out) == 3 else (*out, {})
    if not isinstance(aux, Mapping):
      raise TypeError(f"loss_fn's aux must be a dict of scalars, got {type(aux).__name__}")
    clash = sorted(set(aux) & set(RESERVED_METRICS))
    if clash:
      raise ValueError(f"loss_fn's aux names {clash} are reserved; rename them")
    aux = {k: jnp.asarray(v, jnp.float32).reshape(()) for k, v in aux.items()}
    return loss_sum, (weight_sum, aux)

  return wrapped


def jit_train_step(step_fn, mesh, state_shardings, frozen_shardings):
  """pjit: state and frozen parameters placed by their shardings, the batch split over
  ``data`` x ``fsdp``; the old state is donated. The step is traced under
  ``sharding.activation_mesh(mesh)``, so the models' activation constraints apply."""
  rep = sharding.replicated(mesh)

  @functools.wraps(step_fn)  # keeps the step's name in profiles: jit(step_fn)
  def constrained_step(state, frozen, batch, rng):
    with sharding.activation_mesh(mesh):
      return step_fn(state, frozen, batch, rng)

  return jax.jit(
    constrained_step,
    in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh), rep),
    out_shardings=(state_shardings, rep),
    donate_argnums=(0,),
  )
