"""Router statistics as named float scalars for the step contract's ``aux`` (TensorBoard tags
``train/router/...``): per MoM block b and router kind (``attn``/``ffn``)

* ``router/<kind><b>_load<m>``: the share of kept slots that went to module m (real tokens,
  averaged over the H rounds; uniform routing without SKIP gives 1/N);
* ``router/<kind><b>_skip_round<r>``: the share of kept slots that were SKIP in round r;
* ``router/<kind><b>_entropy``: the mean entropy (nats) of the router's probabilities;
* ``router/dropped``: the share of routed (non-SKIP) slots the capacity buffers dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modjax.methods.mom.routers import Routing
from modjax.methods.mom.structure import MoMConfig


def slot_load(r: Routing):
  """[S]: the share of real tokens' kept slots that chose each slot."""
  slots, k = r.probs_BLS.shape[-1], r.index_BLK.shape[-1]
  chosen = jnp.sum(jax.nn.one_hot(r.index_BLK, slots, dtype=jnp.float32), axis=2)  # BLS
  count = jnp.maximum(jnp.sum(r.mask_BL), 1.0) * k
  return jnp.sum(chosen * r.mask_BL[..., None], axis=(0, 1)) / count


def mean_entropy(r: Routing):
  p = r.probs_BLS
  entropy_BL = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)
  return jnp.sum(entropy_BL * r.mask_BL) / jnp.maximum(jnp.sum(r.mask_BL), 1.0)


def block_metrics(cfg: MoMConfig, b: int, routings: dict[str, list[Routing]]) -> dict:
  """The statistics of MoM block ``b`` from its rounds' routings."""
  out = {}
  for kind, rounds in routings.items():
    loads = [slot_load(r) for r in rounds]
    mean_load = sum(loads) / len(loads)
    for m in range(cfg.modules(kind)):
      out[f"router/{kind}{b}_load{m}"] = mean_load[m]
    if cfg.skip:
      for i, load in enumerate(loads):
        out[f"router/{kind}{b}_skip_round{i}"] = load[-1]
    out[f"router/{kind}{b}_entropy"] = sum(mean_entropy(r) for r in rounds) / len(rounds)
  return out
