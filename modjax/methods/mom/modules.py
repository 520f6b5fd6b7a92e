"""A pool's modules applied to per-module token buffers: modjax's own layers, vmapped over the
pool's leading ``expert`` axis.

A pool entry is shaped like part of a GPT-2 block with a leading axis of N modules
(``self_attn_norm`` + ``self_attn`` for an attention pool, ``ffn_norm`` + ``ffn`` for an FFN
pool), so each function here is ``jax.vmap`` of :mod:`modjax.nn.layers`' ``Norm``, ``Attention``
and ``FeedForward`` over that axis: buffer ``[N, C, ...]`` in, ``[N, C, ...]`` out, one batched
matmul per weight whatever C is (all tokens for the dense path, a capacity for dispatch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modjax.core.model_config import to_dtype
from modjax.nn.layers import Attention, BlockSpec, FeedForward, Norm


def _norm(spec: BlockSpec) -> Norm:
  return Norm(spec.norm, spec.norm_eps, to_dtype(spec.param_dtype), to_dtype(spec.dtype))


def pool_norm(spec: BlockSpec, norm_params, x_NCD):
  """Each module's own norm of its buffer."""
  apply = lambda p, x: _norm(spec).apply({"params": p}, x)  # noqa: E731
  return jax.vmap(apply)(norm_params, x_NCD)


def _qkv(spec: BlockSpec, params, h_CD):
  q, k, v = Attention(spec).apply({"params": params}, h_CD[None], method="project_qkv")
  return jnp.transpose(jnp.stack([q[0], k[0], v[0]]), (2, 0, 1, 3))  # [C, 3, H, K]


def pool_qkv(spec: BlockSpec, attn_params, h_NCD):
  """Each module's query, key and value projections (with biases): ``[N, C, 3, H, K]``."""
  return jax.vmap(lambda p, h: _qkv(spec, p, h))(attn_params, h_NCD)


def _out(module: Attention, ctx_CHK):
  return module.out(ctx_CHK)


def pool_out(spec: BlockSpec, attn_params, ctx_NCHK):
  """Each module's attention output projection (with bias): ``[N, C, D]``."""
  apply = lambda p, c: Attention(spec).apply({"params": p}, c, method=_out)  # noqa: E731
  return jax.vmap(apply)(attn_params, ctx_NCHK)


def pool_ffn(spec: BlockSpec, ffn_params, h_NCD, *, deterministic: bool, rng=None):
  """Each module's feed-forward sublayer (its own dropout key per module)."""
  modules = h_NCD.shape[0]
  keys = jax.random.split(rng, modules) if rng is not None else jnp.zeros((modules,), jnp.uint32)

  def apply(p, h, key):
    rngs = {} if rng is None else {"dropout": key}
    return FeedForward(spec).apply({"params": p}, h, deterministic, rngs=rngs)

  return jax.vmap(apply)(ffn_params, h_NCD, keys)


def attention_context(spec: BlockSpec, qkv_BL3HK, bias, *, deterministic: bool, rng=None):
  """One causal attention on summed projections: ``context_BLHK`` (before any output
  projection; ``layers.Attention.context``)."""
  q, k, v = (jnp.transpose(qkv_BL3HK[:, :, i], (0, 2, 1, 3)) for i in range(3))  # BHLK
  rngs = {} if rng is None else {"dropout": rng}
  ctx, _ = Attention(spec).apply(
    {"params": {}}, q, k, v, bias, deterministic, method="context", rngs=rngs
  )
  return ctx
