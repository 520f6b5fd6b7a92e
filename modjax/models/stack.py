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

from modjax.core.plan import Slot
from modjax.models.bank import slot_params
from modjax.nn.layers import Block, BlockSpec


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


# What ``collect`` can select, per slot: the hidden state after the slot, the self- and
# cross-attention probabilities (BHLT), the FFN pre-activation fed to the nonlinearity (BLF; the
# gate branch ``wi_0`` for gated FFNs) and, for gated FFNs, the linear branch ``wi_1`` (BLF).
INTERMEDIATES = ("hidden", "self_attn", "cross_attn", "ffn_pre", "ffn_linear")
DEFAULT_COLLECT = frozenset({"hidden", "self_attn", "cross_attn"})


def collect_selection(collect) -> frozenset[str]:
  """``collect`` as a set of names: False/None = nothing, True = hidden states and attention
  probabilities, or any iterable of :data:`INTERMEDIATES`."""
  if collect is None or collect is False:
    return frozenset()
  if collect is True:
    return DEFAULT_COLLECT
  names = frozenset([collect] if isinstance(collect, str) else collect)
  unknown = names - set(INTERMEDIATES)
  if unknown:
    raise ValueError(f"cannot collect {sorted(unknown)}; choose from {INTERMEDIATES}")
  return names


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
  collect=False,
):
  """Applies ``slots`` in order. Returns (x_BLD, intermediates or None).

  ``collect`` selects intermediates (see :func:`collect_selection`); the result maps each
  selected name to a tuple with one array per slot. Nothing unselected is computed or kept
  (``cross_attn`` is left out for stacks without cross-attention, ``ffn_linear`` for ungated FFNs).
  """
  selected = collect_selection(collect)
  if not spec.has_cross_attention:
    selected -= {"cross_attn"}
  if not spec.gated_ffn:
    selected -= {"ffn_linear"}
  sown = sorted(selected & {"ffn_pre", "ffn_linear"})
  block = Block(spec)
  out = {name: [] for name in selected}
  for position, slot in enumerate(slots):
    rngs = {}
    if not deterministic and dropout_rng is not None:
      rngs["dropout"] = jax.random.fold_in(dropout_rng, position)
    result = block.apply(
      {"params": slot_params(stack_params, slot)},
      x_BLD,
      self_bias,
      enc_BTD,
      cross_bias,
      deterministic=deterministic,
      rngs=rngs,
      mutable=["intermediates"] if sown else False,
    )
    (x_BLD, s_probs, c_probs), sown_vars = result if sown else (result, {})
    found = {"hidden": x_BLD, "self_attn": s_probs, "cross_attn": c_probs}
    for name in sown:
      found[name] = sown_vars["intermediates"]["ffn"][name][0]
    for name in selected:
      out[name].append(found[name])
  if not collect:
    return x_BLD, None
  return x_BLD, {name: tuple(values) for name, values in out.items()}
