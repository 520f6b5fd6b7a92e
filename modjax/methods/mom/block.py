"""One MoM block: H rounds of routed attention then routed FFN over the block's pools."""

from __future__ import annotations

import functools

import jax

from modjax.methods.mom.dispatch import transport
from modjax.methods.mom.routers import initial_state, route
from modjax.methods.mom.structure import MoMConfig
from modjax.methods.mom.sublayers import attention_sublayer, ffn_sublayer
from modjax.nn.dropout import dropout
from modjax.nn.layers import BlockSpec


def _residual_dropout(spec: BlockSpec, y, key):
  return y if key is None else dropout(y, spec.dropout_rate, key)


def mom_block(
  spec: BlockSpec,
  cfg: MoMConfig,
  decoder,
  b: int,
  x_BLD,
  bias,
  mask_BL,
  *,
  deterministic: bool = True,
  rng=None,
  attend=None,
):
  """Runs MoM block ``b`` of the ``decoder`` stack parameters on ``x_BLD``.

  Returns ``(x_BLD, routings, dropped)``: ``routings = {"attn": [...], "ffn": [...]}`` one
  :class:`Routing` per round, ``dropped`` one capacity-drop share per routed sublayer. Each
  router's state (GRU) starts at zero here and carries across the rounds. ``attend``:
  ``(round, qkv_BL3HK) -> context_BLHK`` in place of the causal attention under ``bias``
  (cached decoding reads and writes round r's cache there).
  """
  pools, routers = decoder["pools"], decoder["routers"]
  attn_pool, ffn_pool = pools[f"attn_{b}"], pools[f"ffn_{b}"]
  states = {"attn": initial_state(cfg, x_BLD), "ffn": initial_state(cfg, x_BLD)}
  routings, dropped = {"attn": [], "ffn": []}, []
  use_rng = rng is not None and not deterministic
  for r in range(cfg.rounds):
    keys = list(jax.random.split(jax.random.fold_in(rng, r), 4)) if use_rng else [None] * 4
    routing, states["attn"] = route(cfg, routers[f"attn_{b}"], x_BLD, states["attn"], mask_BL)
    carrier = transport(cfg.dispatch, routing, cfg.num_attn, cfg.capacity_factor)
    y = attention_sublayer(
      spec,
      attn_pool,
      routing,
      carrier,
      x_BLD,
      bias,
      weighted_qkv=cfg.weighted_qkv,
      deterministic=deterministic,
      rng=keys[0],
      attend=None if attend is None else functools.partial(attend, r),
    )
    x_BLD = x_BLD + _residual_dropout(spec, y, keys[1])
    routings["attn"].append(routing)
    dropped.append(carrier.dropped)

    routing, states["ffn"] = route(cfg, routers[f"ffn_{b}"], x_BLD, states["ffn"], mask_BL)
    carrier = transport(cfg.dispatch, routing, cfg.num_ffn, cfg.capacity_factor)
    y = ffn_sublayer(
      spec, ffn_pool, routing, carrier, x_BLD, deterministic=deterministic, rng=keys[2]
    )
    x_BLD = x_BLD + _residual_dropout(spec, y, keys[3])
    routings["ffn"].append(routing)
    dropped.append(carrier.dropped)
  return x_BLD, routings, dropped
