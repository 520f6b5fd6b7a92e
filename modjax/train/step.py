"""A generic train step: any loss function, a trainable and a frozen part of the parameters.

``loss_fn(params, frozen, batch, rng) -> (loss_sum, weight_sum)``; the step differentiates the
sum with respect to ``params`` only, so ``frozen`` (a teacher, the fixed part of a bank) costs
no optimizer memory, and divides by the total weight across microbatches and devices, which makes
gradient accumulation exact. Jitted with in/out shardings and a donated state (pjit semantics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from modjax import sharding


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
  """The (unjitted) step ``(state, frozen, batch, rng) -> (state, metrics)``.

  ``rng`` is the run's base key; the step folds in its step number, so dropout is the same
  whether or not a run was interrupted and resumed.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state: TrainState, frozen, batch: Mapping, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    if num_microbatches == 1:
      (loss_sum, weight), grads = grad_fn(state.params, frozen, batch, step_rng)
    else:

      def accumulate(carry, inputs):
        index, micro = inputs
        (loss, weight), grad = grad_fn(
          state.params, frozen, micro, jax.random.fold_in(step_rng, index)
        )
        loss_acc, weight_acc, grad_acc = carry
        return (loss_acc + loss, weight_acc + weight, jax.tree.map(jnp.add, grad_acc, grad)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      micro = (jnp.arange(num_microbatches), _split_microbatches(batch, num_microbatches))
      (loss_sum, weight, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
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
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step_fn


def jit_train_step(step_fn, mesh, state_shardings, frozen_shardings):
  """pjit: state and frozen parameters placed by their shardings, the batch split over
  ``data`` x ``fsdp``; the old state is donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh), rep),
    out_shardings=(state_shardings, rep),
    donate_argnums=(0,),
  )


def partition_params(params, is_trainable: Callable[[tuple[str, ...]], bool]):
  """Splits a nested dict into (trainable, frozen) by a predicate on each leaf's key path."""

  def walk(node, path):
    if not isinstance(node, Mapping):
      return (node, None) if is_trainable(path) else (None, node)
    trainable, frozen = {}, {}
    for key, child in node.items():
      t, f = walk(child, path + (key,))
      if not _empty(t):
        trainable[key] = t
      if not _empty(f):
        frozen[key] = f
    return trainable, frozen

  return walk(params, ())


def _empty(node) -> bool:
  return node is None or (isinstance(node, Mapping) and not node)


def merge_params(a: Mapping, b: Mapping) -> dict:
  """Deep union of two disjoint nested dicts (the inverse of :func:`partition_params`)."""
  out = dict(a)
  for key, value in b.items():
    if key in out:
      if not (isinstance(out[key], Mapping) and isinstance(value, Mapping)):
        raise ValueError(
          f"parameter {key!r} is in both parts; trainable and frozen must be disjoint"
        )
      out[key] = merge_params(out[key], value)
    else:
      out[key] = value
  return out
