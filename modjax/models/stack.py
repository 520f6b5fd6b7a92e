"""Running a stack of blocks in the order a plan gives; shared by every architecture.

A stack's parameters are ``{"blocks": {name: block_params}, "ffns": {name: ffn_params}, ...}``;
the plan's slots pick blocks (and optionally a shared FFN entry) by name. The loop is unrolled in
Python: the plan is static, so each plan compiles to its own graph with no dispatch cost.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from modjax.layers import Block, BlockSpec
from modjax.plan import Slot


def slot_params(stack_params: Mapping, slot: Slot) -> dict:
  """Parameters of the block at ``slot``, with its FFN replaced by the slot's shared entry."""
  params = stack_params["blocks"][slot.block]
  if slot.ffn is None:
    return params
  return {**params, "ffn": stack_params["ffns"][slot.ffn]}


def init_block(spec: BlockSpec, rng, width: int = 8):
  """Boxed (logically partitioned) parameters of one block."""
  x = jnp.zeros((1, width, spec.d_model), jnp.float32)
  bias = jnp.zeros((1, 1, width, width), jnp.float32)
  enc = x if spec.has_cross_attention else None
  cross_bias = bias if spec.has_cross_attention else None
  return Block(spec).init({"params": rng}, x, bias, enc, cross_bias)["params"]


def split_boxed(boxed):
  """(plain parameters, logical PartitionSpec tree) from boxed Linen parameters."""
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def run_stack(
  stack_params: Mapping,
  slots: tuple[Slot, ...],
  spec: BlockSpec,
  x_BLD,
  self_bias,
  enc_BTD=None,
  cross_bias=None,
  *,
  deterministic: bool = True,
  dropout_rng=None,
  collect: bool = False,
):
  """Applies ``slots`` in order. Returns (x_BLD, intermediates or None).

  With ``collect``, intermediates hold per slot the hidden state after the slot
  (``hidden``), the self-attention probabilities (``self_attn``) and, for blocks with
  cross-attention, the cross-attention probabilities (``cross_attn``).
  """
  block = Block(spec)
  hidden, self_probs, cross_probs = [], [], []
  for position, slot in enumerate(slots):
    rngs = {}
    if not deterministic and dropout_rng is not None:
      rngs["dropout"] = jax.random.fold_in(dropout_rng, position)
    x_BLD, s_probs, c_probs = block.apply(
      {"params": slot_params(stack_params, slot)},
      x_BLD,
      self_bias,
      enc_BTD,
      cross_bias,
      deterministic=deterministic,
      rngs=rngs,
    )
    if collect:
      hidden.append(x_BLD)
      self_probs.append(s_probs)
      if spec.has_cross_attention:
        cross_probs.append(c_probs)
  if not collect:
    return x_BLD, None
  out = {"hidden": tuple(hidden), "self_attn": tuple(self_probs)}
  if spec.has_cross_attention:
    out["cross_attn"] = tuple(cross_probs)
  return x_BLD, out
