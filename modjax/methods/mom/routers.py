"""Routers: per-token scores over a pool's slots, top-K gates and the Switch balancing loss.

A router reads the residual stream (before any norm, as the authors' code does) and scores the
pool's slots: modules ``0 .. N-1`` and, with SKIP, slot ``N``. Kinds (``MoMConfig.router``):

* ``linear``: ``x W + b`` (Switch Transformer's router);
* ``mlp``: ``relu(x W1 + b1) W2 + b2`` with ``router_dim`` hidden units (the authors' "naive");
* ``gru``: the paper's GRU cell over the H rounds of a block: its state starts at zero in every
  MoM block and carries from round to round, and ``state W + b`` gives the scores.

Parameters are plain dicts ``{"input": {kernel, bias}, ...}`` (``input`` reads the residual
stream, so its kernel carries the ``embed`` axis; the rest is replicated).

Gates (``MoMConfig.gate``) from the scores s, with p = softmax(s / temperature):

* ``renormalized`` (DESIGN.md; the authors' ``*softmax*`` routers): the top K of p kept and
  renormalised to sum to one, computed as the softmax of the kept ``s / temperature`` (the same
  value). With K=1 the kept weight is exactly 1 whatever the scores and its gradient is exactly
  zero, so no gradient of the task loss reaches the router: it learns from the balancing loss
  alone.
* ``straight_through``: the forward value of ``renormalized`` (exactly; 1 for K=1), with the
  gradient of ``g_k log p_k`` for kept slot k (g: the renormalised gates), i.e. the weight
  ``sg(g) * (1 + log p - sg(log p))``. For K=1 that is the gradient of log p: the task loss's
  derivative by the kept module's weight, times d log p. For K>1 it equals the gradient of
  ``p_k / sg(sum of kept p)``: the renormalisation's denominator is held constant, so each
  kept slot is pushed by its own probability, not only by the ratio among the kept ones. Scaling
  by g (instead of the bare log p) keeps the gradient of a K>1 gate on the scale of its value.
  It trains the router through the task loss while the forward pass stays the paper's.
* ``softmax`` (Switch Transformer): the kept p as they are; the task loss trains the router.
* ``raw`` (the authors' routers without ``softmax`` in their type): the top K raw scores are
  the weights; p = softmax(s) only for the balancing loss and statistics, as their code does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from modjax.methods.mom.structure import MoMConfig

INIT_STDDEV = 0.02  # GPT-2's initializer_range, which the authors' routers (nn.Linear) get too


class Routing(NamedTuple):
  """One router's decision for every token of a batch."""

  probs_BLS: jax.Array  # float32 softmax(scores / temperature) over the S slots
  index_BLK: jax.Array  # int32 kept slots, best first; N means SKIP
  weight_BLK: jax.Array  # float32 gates of the kept slots; 0 for padding tokens
  mask_BL: jax.Array  # float32 1 for real tokens, 0 for padding


def _layer(rng, fan_in: int, fan_out: int) -> dict:
  kernel = INIT_STDDEV * jax.random.normal(rng, (fan_in, fan_out), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((fan_out,), jnp.float32)}


def init_router(kind: str, rng, d_model: int, slots: int, router_dim: int) -> dict:
  """Fresh router parameters (normal(0.02) kernels, zero biases)."""
  k1, k2, k3 = jax.random.split(rng, 3)
  if kind == "linear":
    return {"input": _layer(k1, d_model, slots)}
  if kind == "mlp":
    return {"input": _layer(k1, d_model, router_dim), "output": _layer(k2, router_dim, slots)}
  return {
    "input": _layer(k1, d_model, 3 * router_dim),
    "recurrent": _layer(k2, router_dim, 3 * router_dim),
    "output": _layer(k3, router_dim, slots),
  }


def router_axes(params: dict) -> dict:
  """Logical axes: the kernel reading the residual stream is ``("embed", None)``."""
  return {
    name: {
      "kernel": PartitionSpec("embed", None) if name == "input" else PartitionSpec(None, None),
      "bias": PartitionSpec(None),
    }
    for name in params
  }


def initial_state(cfg: MoMConfig, x_BLD):
  """The GRU state at the start of a MoM block (zeros); None for stateless routers."""
  if cfg.router != "gru":
    return None
  return jnp.zeros(x_BLD.shape[:-1] + (cfg.router_dim,), jnp.float32)


def _apply(layer: dict, x):
  return x @ layer["kernel"].astype(jnp.float32) + layer["bias"].astype(jnp.float32)


def router_scores(kind: str, params: dict, x_BLD, state_BLR):
  """(scores_BLS, next state) in float32."""
  x = x_BLD.astype(jnp.float32)
  if kind == "linear":
    return _apply(params["input"], x), state_BLR
  if kind == "mlp":
    return _apply(params["output"], jax.nn.relu(_apply(params["input"], x))), state_BLR
  gx_r, gx_z, gx_n = jnp.split(_apply(params["input"], x), 3, axis=-1)
  gh_r, gh_z, gh_n = jnp.split(_apply(params["recurrent"], state_BLR), 3, axis=-1)
  reset = jax.nn.sigmoid(gx_r + gh_r)
  update = jax.nn.sigmoid(gx_z + gh_z)
  new = jnp.tanh(gx_n + reset * gh_n)
  state = new + update * (state_BLR - new)
  return _apply(params["output"], state), state


def top_k_gates(scores_BLS, mask_BL, cfg: MoMConfig) -> Routing:
  """The top K slots and their weights (``cfg.gate``, module docstring)."""
  if cfg.gate == "raw":
    probs = jax.nn.softmax(scores_BLS, axis=-1)
    weight, index = jax.lax.top_k(scores_BLS, cfg.top_k)
  else:
    scaled_BLS = scores_BLS / cfg.temperature
    probs = jax.nn.softmax(scaled_BLS, axis=-1)
    weight, index = jax.lax.top_k(probs, cfg.top_k)
    if cfg.gate in ("renormalized", "straight_through"):
      weight = _renormalized(scaled_BLS, index, straight_through=cfg.gate == "straight_through")
  mask = mask_BL.astype(jnp.float32)
  return Routing(probs, index.astype(jnp.int32), weight * mask[..., None], mask)


def _renormalized(scaled_BLS, index_BLK, *, straight_through: bool):
  """The kept slots' probabilities renormalised: softmax over the kept scaled scores, whose
  derivative is exactly zero for one kept slot (``p / p`` would leave rounding residue there).
  ``straight_through``: the same value, with the gradient of ``g log p`` (module docstring)."""
  kept_BLK = jnp.take_along_axis(scaled_BLS, index_BLK, axis=-1)
  gates_BLK = jax.nn.softmax(kept_BLK, axis=-1)
  if not straight_through:
    return gates_BLK
  log_p_BLK = jnp.take_along_axis(jax.nn.log_softmax(scaled_BLS, axis=-1), index_BLK, axis=-1)
  # log p - sg(log p) is exactly 0 in the forward pass (log_softmax is finite), so the value
  # is exactly the renormalised gate; its derivative is d log p, scaled by the gate
  moved_BLK = log_p_BLK - jax.lax.stop_gradient(log_p_BLK)
  return jax.lax.stop_gradient(gates_BLK) * (1.0 + moved_BLK)


def route(cfg: MoMConfig, params: dict, x_BLD, state, mask_BL):
  """(Routing, next router state) of one round."""
  scores, state = router_scores(cfg.router, params, x_BLD, state)
  return top_k_gates(scores, mask_BL, cfg), state


# ---- the Switch Transformer balancing loss ------------------------------------------------------


def switch_terms(r: Routing):
  """(f_S, P_S): the fraction of real tokens whose first choice is each slot, and the mean
  router probability of each slot (Switch Transformer, eq. 4-6)."""
  count = jnp.maximum(jnp.sum(r.mask_BL), 1.0)
  slots = r.probs_BLS.shape[-1]
  first = jax.nn.one_hot(r.index_BLK[..., 0], slots, dtype=jnp.float32)
  f = jnp.sum(first * r.mask_BL[..., None], axis=(0, 1)) / count
  p = jnp.sum(r.probs_BLS * r.mask_BL[..., None], axis=(0, 1)) / count
  return f, p


def switch_loss(f_S, p_S):
  """``S * sum_i f_i P_i``: 1 when routing is uniform, up to S when it collapses."""
  return f_S.shape[-1] * jnp.sum(f_S * p_S)


def balance_loss(routings: dict[str, list[Routing]], cfg: MoMConfig):
  """The balancing loss over every round of every MoM block. ``routings``: ``{"attn": [...],
  "ffn": [...]}`` in round order. ``depthwise``: each round's attention + FFN loss, averaged
  over rounds; ``pooled``: per router kind, one loss over all rounds' tokens."""
  if cfg.balance == "depthwise":
    per_round = [
      sum(switch_loss(*switch_terms(r)) for r in rounds)
      for rounds in zip(routings["attn"], routings["ffn"], strict=True)
    ]
    return sum(per_round) / len(per_round)
  total = 0.0
  for kind_routings in routings.values():
    terms = [switch_terms(r) for r in kind_routings]
    f = sum(t[0] for t in terms) / len(terms)
    p = sum(t[1] for t in terms) / len(terms)
    total = total + switch_loss(f, p)
  return total
