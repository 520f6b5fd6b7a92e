"""The two routed sublayers of a MoM round, over any transport (:mod:`.dispatch`).

Attention: each kept module's norm and q, k, v projections (biases included) run on the tokens
routed to it; per token the kept modules' q, k, v are summed (each scaled by its routing weight
with ``weighted_qkv``, the authors' option), ONE causal attention runs on the sums, and the
output is the routing-weighted sum of the kept modules' output projections of that context. FFN:
the routing-weighted sum of the kept modules' ``ffn(norm(x))``. A token whose every kept slot is
SKIP gets zero from the sublayer (its q, k, v are zero too: other tokens still see it as a zero
key and value, as in the authors' code). Both return the residual branch (no residual added).

The attention itself is replaceable (``attend``): cached decoding writes each round's summed keys
and values into that round's cache and attends over it (:mod:`.decoding`); routing, the modules
and the output projections stay the same code.
"""

from __future__ import annotations

import jax.numpy as jnp

from modjax.methods.mom import modules as mods
from modjax.methods.mom.routers import Routing
from modjax.nn.layers import BlockSpec


def _tokens(x_BLD):
  return x_BLD.reshape((-1,) + x_BLD.shape[2:])


def attention_sublayer(
  spec: BlockSpec,
  pool,
  routing: Routing,
  carrier,
  x_BLD,
  bias,
  *,
  weighted_qkv: bool,
  deterministic: bool = True,
  rng=None,
  attend=None,
):
  """Routed self-attention of one round (``carrier``: a transport of ``routing``). ``attend``:
  ``qkv_BL3HK -> context_BLHK`` in place of the attention under ``bias``."""
  batch, length, _ = x_BLD.shape
  pool = carrier.params(pool)
  h_NCD = mods.pool_norm(spec, pool["self_attn_norm"], carrier.send(_tokens(x_BLD)))
  qkv_NC3HK = mods.pool_qkv(spec, pool["self_attn"], h_NCD)
  weight_TK = routing.weight_BLK.reshape(batch * length, -1)
  if weighted_qkv:
    coef_TK = weight_TK
  else:  # every kept module counts once (SKIP and dropped rows give nothing anyway)
    coef_TK = jnp.broadcast_to(routing.mask_BL.reshape(-1, 1), weight_TK.shape)
  qkv_T3HK = carrier.receive(qkv_NC3HK, coef_TK)
  qkv_BL3HK = qkv_T3HK.reshape((batch, length) + qkv_T3HK.shape[1:])
  if attend is None:
    ctx_BLHK = mods.attention_context(spec, qkv_BL3HK, bias, deterministic=deterministic, rng=rng)
  else:
    ctx_BLHK = attend(qkv_BL3HK)
  out_NCD = mods.pool_out(spec, pool["self_attn"], carrier.send(_tokens(ctx_BLHK)))
  return carrier.receive(out_NCD, weight_TK).reshape(x_BLD.shape)


def ffn_sublayer(
  spec: BlockSpec, pool, routing: Routing, carrier, x_BLD, *, deterministic=True, rng=None
):
  """Routed feed-forward of one round."""
  pool = carrier.params(pool)
  h_NCD = mods.pool_norm(spec, pool["ffn_norm"], carrier.send(_tokens(x_BLD)))
  y_NCD = mods.pool_ffn(spec, pool["ffn"], h_NCD, deterministic=deterministic, rng=rng)
  weight_TK = routing.weight_BLK.reshape(-1, routing.weight_BLK.shape[-1])
  return carrier.receive(y_NCD, weight_TK).reshape(x_BLD.shape)
