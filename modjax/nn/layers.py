"""Transformer components shared by every architecture (Flax Linen, pure-functional).

Parameters carry logical axis names (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``,
``relpos_buckets``, ``positions``); ``modjax.core.sharding`` maps them to mesh axes. Shapes are
named in suffixes: B batch, L/Q query length, T/K key length, D model width, H heads,
K head width (``..._BHTK``), F feed-forward width, V vocabulary.

One :class:`Block` serves T5 (RMS norm, no biases, unscaled attention with a relative
position bias, ReLU or gated-GELU FFN, optional cross-attention) and GPT-2 (layer norm,
biases, 1/sqrt(K)-scaled attention, GELU FFN). The block's parameters are named
``self_attn_norm``, ``self_attn``, ``cross_attn_norm``, ``cross_attn``, ``ffn_norm``,
``ffn``, so a plan can swap the ``ffn`` entry for a shared (tied) one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from modjax.core.model_config import to_dtype
from modjax.core.sharding import CONTEXT_AXES, FFN_AXES, HEADS_AXES, HIDDEN_AXES, constrain
from modjax.nn.contractions import dense, tied_logits
from modjax.nn.dropout import Dropout

NEG_INF = -1e10  # additive mask value; finite so fully masked rows stay NaN-free


def _normal(stddev: float):
  return nn.initializers.normal(stddev=stddev)


def activation_fn(name: str):
  """The FFN nonlinearity under Hugging Face's ``ACT2FN`` name: 'gelu' is the exact (erf) GELU and
  'gelu_new' its tanh approximation; they differ by up to ~5e-4, enough to break logit parity."""
  if name == "relu":
    return jax.nn.relu
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unknown activation {name!r}; use 'relu', 'gelu' or 'gelu_new'")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Architecture of one transformer block; hashable, derived from a model config."""

  d_model: int
  num_heads: int
  head_dim: int
  d_ff: int
  norm: str  # "rms" (T5) or "layer" (GPT-2)
  norm_eps: float
  use_bias: bool
  attn_scale: float  # multiplies q.k; 1.0 for T5 (folded into init), 1/sqrt(K) for GPT-2
  activation: str
  gated_ffn: bool
  has_cross_attention: bool
  dropout_rate: float
  attn_dropout_rate: float
  # Initialisation scales (stddev of normal inits).
  init_q: float
  init_kv: float
  init_out: float
  init_wi: float
  init_wo: float
  param_dtype: str = "float32"
  dtype: str = "float32"


class Norm(nn.Module):
  """RMS norm (T5, statistics in float32) or layer norm with bias (GPT-2)."""

  kind: str
  eps: float
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    d = x_BLD.shape[-1]
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      (d,),
      self.param_dtype,
    )
    x = x_BLD.astype(jnp.float32)
    if self.kind == "rms":
      x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
      return (x * scale.astype(jnp.float32)).astype(self.dtype)
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      (d,),
      self.param_dtype,
    )
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (x * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Projection(nn.Module):
  """``y = x . kernel (+ bias)`` contracting ``in_dims`` leading kernel axes with x's trailing ones."""

  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  in_dims: int
  stddev: float
  use_bias: bool = False
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(_normal(self.stddev), self.kernel_axes),
      self.kernel_shape,
      self.param_dtype,
    )
    y = dense(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)
    if self.use_bias:
      out_shape, out_axes = self.kernel_shape[self.in_dims :], self.kernel_axes[self.in_dims :]
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, out_axes),
        out_shape,
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Multi-head attention split into projection and attend steps, so decoding can cache k/v."""

  spec: BlockSpec

  def setup(self):
    s = self.spec
    d, h, k = s.d_model, s.num_heads, s.head_dim
    kw = dict(use_bias=s.use_bias, param_dtype=to_dtype(s.param_dtype), dtype=to_dtype(s.dtype))
    self.query = Projection((d, h, k), ("embed", "heads", "kv"), 1, s.init_q, **kw)
    self.key = Projection((d, h, k), ("embed", "heads", "kv"), 1, s.init_kv, **kw)
    self.value = Projection((d, h, k), ("embed", "heads", "kv"), 1, s.init_kv, **kw)
    self.out = Projection((h, k, d), ("heads", "kv", "embed"), 2, s.init_out, **kw)
    self.dropout = Dropout(s.attn_dropout_rate)

  # Heads-major layouts (BHLK/BHTK) keep batch and heads as the leading dims of both attention
  # matmuls: XLA:CPU runs those as plain batched GEMMs, several times faster than BTHK.
  def project_q(self, x_BLD):
    return constrain(jnp.swapaxes(self.query(x_BLD), 1, 2), HEADS_AXES, "attention_q")  # BHLK

  def project_kv(self, x_BTD):
    k_BHTK = constrain(jnp.swapaxes(self.key(x_BTD), 1, 2), HEADS_AXES, "attention_k")
    return k_BHTK, constrain(jnp.swapaxes(self.value(x_BTD), 1, 2), HEADS_AXES, "attention_v")

  def project_qkv(self, x_BLD):
    """q, k, v (BHLK) from one matmul against the three kernels side by side.

    For one decoded token per row the three [D, H*K] matmuls are each too narrow for XLA:CPU to
    split across cores; one [D, 3*H*K] matmul is not. The concatenation is loop-invariant, so
    XLA hoists it out of a decoding loop.
    """
    projections = (self.query, self.key, self.value)
    dt = to_dtype(self.spec.dtype)
    kernel = jnp.concatenate([p.get_variable("params", "kernel") for p in projections], axis=1)
    y = jnp.einsum("bld,dhk->blhk", x_BLD.astype(dt), kernel.astype(dt))
    if self.spec.use_bias:
      bias = jnp.concatenate([p.get_variable("params", "bias") for p in projections], axis=0)
      y = y + bias.astype(dt)
    q, k, v = jnp.split(jnp.swapaxes(y, 1, 2), 3, axis=1)
    return q, k, v

  def attend(self, q_BHLK, k_BHTK, v_BHTK, bias_BHLT, deterministic: bool, keys_transposed=False):
    """Returns (output_BLD, probabilities_BHLT); bias holds masks and position bias.

    With ``keys_transposed`` the keys come as BHKT, as decoding stores them (see the decoding
    cache layout below).
    """
    ctx_BLHK, probs_BHLT = self.context(
      q_BHLK, k_BHTK, v_BHTK, bias_BHLT, deterministic, keys_transposed
    )
    return constrain(self.out(ctx_BLHK), HIDDEN_AXES, "attention_output"), probs_BHLT

  def context(self, q_BHLK, k_BHTK, v_BHTK, bias_BHLT, deterministic: bool, keys_transposed=False):
    """(context_BLHK, probabilities_BHLT): :meth:`attend` before its output projection, so a
    caller can project one context through several output projections (Mixture-of-Modules)."""
    scores = "bhlk,bhkt->bhlt" if keys_transposed else "bhlk,bhtk->bhlt"
    logits = jnp.einsum(scores, q_BHLK, k_BHTK, preferred_element_type=jnp.float32)
    if self.spec.attn_scale != 1.0:
      logits = logits * self.spec.attn_scale
    probs_BHLT = jax.nn.softmax(logits + bias_BHLT, axis=-1)
    dropped = self.dropout(probs_BHLT, deterministic=deterministic)
    ctx_BHLK = jnp.einsum("bhlt,bhtk->bhlk", dropped.astype(v_BHTK.dtype), v_BHTK)
    return constrain(jnp.swapaxes(ctx_BHLK, 1, 2), CONTEXT_AXES, "attention_context"), probs_BHLT

  def __call__(self, x_BLD, kv_BTD, bias_BHLT, deterministic: bool):
    k, v = self.project_kv(kv_BTD)
    return self.attend(self.project_q(x_BLD), k, v, bias_BHLT, deterministic)


class FeedForward(nn.Module):
  """``wo(act(wi x))``, or gated ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1)."""

  spec: BlockSpec

  def setup(self):
    s = self.spec
    kw = dict(use_bias=s.use_bias, param_dtype=to_dtype(s.param_dtype), dtype=to_dtype(s.dtype))
    if s.gated_ffn:
      self.wi_0 = Projection((s.d_model, s.d_ff), ("embed", "mlp"), 1, s.init_wi, **kw)
      self.wi_1 = Projection((s.d_model, s.d_ff), ("embed", "mlp"), 1, s.init_wi, **kw)
    else:
      self.wi = Projection((s.d_model, s.d_ff), ("embed", "mlp"), 1, s.init_wi, **kw)
    self.wo = Projection((s.d_ff, s.d_model), ("mlp", "embed"), 1, s.init_wo, **kw)
    self.dropout = Dropout(s.dropout_rate)

  def pre_activation(self, x_BLD):
    """The FFN input projection before the nonlinearity (the gate branch when gated)."""
    return self.wi_0(x_BLD) if self.spec.gated_ffn else self.wi(x_BLD)

  def __call__(self, x_BLD, deterministic: bool):
    act = activation_fn(self.spec.activation)
    pre_BLF = self.pre_activation(x_BLD)
    self.sow("intermediates", "ffn_pre", pre_BLF)  # kept only when the caller asks for it
    h_BLF = act(pre_BLF)
    if self.spec.gated_ffn:
      linear_BLF = self.wi_1(x_BLD)
      self.sow("intermediates", "ffn_linear", linear_BLF)
      h_BLF = h_BLF * linear_BLF
    h_BLF = self.dropout(h_BLF, deterministic=deterministic)
    if x_BLD.ndim != 3:  # a token buffer without batch and length axes (a MoM module's, vmapped)
      return self.wo(h_BLF)
    h_BLF = constrain(h_BLF, FFN_AXES, "ffn_hidden")
    return constrain(self.wo(h_BLF), HIDDEN_AXES, "ffn_output")


class Block(nn.Module):
  """Pre-norm residual block: self-attention, optional cross-attention, feed-forward."""

  spec: BlockSpec

  def setup(self):
    s = self.spec
    norm = dict(
      kind=s.norm, eps=s.norm_eps, param_dtype=to_dtype(s.param_dtype), dtype=to_dtype(s.dtype)
    )
    self.self_attn_norm = Norm(**norm)
    self.self_attn = Attention(s)
    if s.has_cross_attention:
      self.cross_attn_norm = Norm(**norm)
      self.cross_attn = Attention(s)
    self.ffn_norm = Norm(**norm)
    self.ffn = FeedForward(s)
    self.dropout = Dropout(s.dropout_rate)

  def _ffn_residual(self, x_BLD, deterministic):
    return x_BLD + self.dropout(
      self.ffn(self.ffn_norm(x_BLD), deterministic), deterministic=deterministic
    )

  def __call__(
    self, x_BLD, self_bias_BHLL, enc_BTD=None, cross_bias_BHLT=None, *, deterministic=True
  ):
    """Full-sequence pass. Returns (x_BLD, self_probs_BHLL, cross_probs_BHLT or None)."""
    h_BLD = self.self_attn_norm(x_BLD)
    y, self_probs = self.self_attn(h_BLD, h_BLD, self_bias_BHLL, deterministic)
    x_BLD = x_BLD + self.dropout(y, deterministic=deterministic)
    cross_probs = None
    if self.spec.has_cross_attention:
      y, cross_probs = self.cross_attn(
        self.cross_attn_norm(x_BLD), enc_BTD, cross_bias_BHLT, deterministic
      )
      x_BLD = x_BLD + self.dropout(y, deterministic=deterministic)
    x_BLD = constrain(self._ffn_residual(x_BLD, deterministic), HIDDEN_AXES, "residual")
    return x_BLD, self_probs, cross_probs

  def cross_kv(self, enc_BSD):
    """Cross-attention keys (BHKS, transposed) and values (BHSK) of the encoder output, computed
    once per sequence for decoding. Transposed keys make the per-token score matmul a plain
    [G, K] x [K, S] product, which XLA:CPU runs several times faster than [G, K] x [S, K]^T."""
    k_BHSK, v_BHSK = self.cross_attn.project_kv(enc_BSD)
    return jnp.swapaxes(k_BHSK, 2, 3), v_BHSK

  def prefill(self, x_BLD, self_bias_BHLL, *, deterministic=True):
    """Self-attention-only pass that also returns its keys and values (decoder-only prompts)."""
    h = self.self_attn_norm(x_BLD)
    k, v = self.self_attn.project_kv(h)
    y, _ = self.self_attn.attend(self.self_attn.project_q(h), k, v, self_bias_BHLL, deterministic)
    return constrain(self._ffn_residual(x_BLD + y, deterministic), HIDDEN_AXES, "residual"), k, v

  def decode_step(self, x_RND, cache, index, self_bias, cross_bias_BH1S=None):
    """N new tokens (N = 1 when decoding token by token) for each of R = B*G rows (B input
    rows, G beams each, consecutive; G = 1 for greedy); writes positions ``index`` ..
    ``index + N - 1`` of every beam slot of the self-attention cache.

    ``index``: a scalar, or [B] (each input row at its own position: speculative decoding's
    rows accept different numbers of tokens). ``cache``: ``k`` [B, H, K, G*T] and ``v``
    [B, H, G*T, K] (see :func:`empty_decode_cache`); for cross-attention also ``cross_kT``
    (BHKS) and ``cross_v`` (BHSK), one row per input row. ``self_bias`` is
    [B or 1, H or 1, G*N, G*T] (:func:`beam_self_bias`); it must hide every position after a
    query's own, so entries written there earlier (rejected draft tokens) are never read.
    """
    batch, tokens = cache["k"].shape[0], x_RND.shape[1]
    h = self.self_attn_norm(x_RND)
    q, k_new, v_new = (_rows_to_beams(a, batch) for a in self.self_attn.project_qkv(h))  # BH(GN)K
    length = decode_cache_length(cache, x_RND.shape[0])
    k, v = cache["k"], cache["v"]
    k_new, v_new = jnp.swapaxes(k_new, 2, 3).astype(k.dtype), v_new.astype(v.dtype)
    for slot in range(q.shape[2] // tokens):  # one in-place write per beam slot, read below
      at, new = slot * length + index, slice(slot * tokens, (slot + 1) * tokens)
      k = _write_positions(k, k_new[..., new], at, axis=3)
      v = _write_positions(v, v_new[:, :, new], at, axis=2)
    y, _ = self.self_attn.attend(q, k, v, self_bias, True, keys_transposed=True)
    x_RND = x_RND + _beams_to_rows(y, tokens)
    new_cache = dict(cache, k=k, v=v)
    if self.spec.has_cross_attention:
      q = _rows_to_beams(self.cross_attn.project_q(self.cross_attn_norm(x_RND)), batch)
      y, _ = self.cross_attn.attend(
        q, cache["cross_kT"], cache["cross_v"], cross_bias_BH1S, True, keys_transposed=True
      )
      x_RND = x_RND + _beams_to_rows(y, tokens)
    return self._ffn_residual(x_RND, True), new_cache


def one_row_index(index):
  """A per-row cache position of a single row ([1]) as a scalar, else ``index`` as is: with one
  row (always at batch 1) a decoding step writes its keys/values with a plain
  dynamic-update-slice and builds its bias for one position, not through per-row (vmapped)
  writes and gathers."""
  index = jnp.asarray(index, jnp.int32)
  return index[0] if index.shape == (1,) else index


def _write_positions(cache, new, at, axis: int):
  """Writes ``new`` into ``cache`` from position ``at`` along ``axis``: one dynamic-update-slice
  for a scalar ``at``, a per-row write (a scatter) for ``at`` of shape [B]."""
  if jnp.ndim(at) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, at, axis=axis)
  write = functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=axis - 1)
  return jax.vmap(write)(cache, new, at)


# ---- decoding cache layout ------------------------------------------------------------------
# Beam search keeps each input row's G beams in G slots of T positions in one per-row cache:
# keys transposed, [B, H, K, G*T] (the per-token score matmul is then a plain
# [G, K] x [K, G*T] product, which XLA:CPU runs several times faster than against a transposed
# operand), values [B, H, G*T, K]. Slot j at position t holds the entry written at step t by
# the beam then in slot j. A beam does not move its history when it changes parent:
# ``ancestry`` [B, G, T] records, per beam and position, the slot holding its ancestor's entry,
# and the attention mask follows it. Each row's G queries attend over its G*T entries in one
# matmul, and no step copies the cache (reordering [B*G, H, T, K] caches would move every
# layer's keys and values each step). Greedy decoding is the one-slot case.


def empty_decode_cache(batch: int, heads: int, head_dim: int, length: int, dtype):
  """Self-attention cache of one layer: ``batch`` rows, one slot of ``length`` positions."""
  return {
    "k": jnp.zeros((batch, heads, head_dim, length), dtype),
    "v": jnp.zeros((batch, heads, length, head_dim), dtype),
  }


def decode_cache_from_prefill(k_BHTK, v_BHTK, length: int):
  """A one-slot cache of ``length`` positions holding prefilled keys/values at the front."""
  pad = length - k_BHTK.shape[2]
  return {
    "k": jnp.pad(jnp.swapaxes(k_BHTK, 2, 3), ((0, 0), (0, 0), (0, 0), (0, pad))),
    "v": jnp.pad(v_BHTK, ((0, 0), (0, 0), (0, pad), (0, 0))),
  }


def add_beam_slots(layer_cache, beams: int):
  """Widens a one-slot cache to ``beams`` slots; slot 0 keeps what was written so far (the
  ancestry of every beam starts there), the others start empty."""
  extra = (beams - 1) * layer_cache["k"].shape[-1]
  return {
    "k": jnp.pad(layer_cache["k"], ((0, 0), (0, 0), (0, 0), (0, extra))),
    "v": jnp.pad(layer_cache["v"], ((0, 0), (0, 0), (0, extra), (0, 0))),
  }


def decode_cache_length(layer_cache, rows: int) -> int:
  """Positions per beam slot of a cache decoding ``rows`` rows."""
  k = layer_cache["k"]
  return k.shape[-1] // (rows // k.shape[0])


def beam_self_bias(bias_xH1T, ancestry_BGT=None):
  """Self-attention bias [B or 1, H or 1, G, G*T] over beam slots from a per-position bias.

  The position bias (relative positions, causal and padding masks) repeats for every slot; a
  beam sees position t only in the slot ``ancestry[b, g, t]``. Without ancestry (greedy) there
  is one slot and the bias is returned as is.
  """
  if ancestry_BGT is None:
    return bias_xH1T
  batch, beams, length = ancestry_BGT.shape
  own_BGJT = ancestry_BGT[:, :, None, :] == jnp.arange(beams)[None, None, :, None]
  own = jnp.where(own_BGJT, 0.0, NEG_INF).reshape(batch, 1, beams, beams * length)
  return jnp.tile(bias_xH1T, (1, 1, 1, beams)) + own


def _rows_to_beams(x_RHNK, batch: int):
  """[B*G, H, N, K] rows (a row's beams consecutive) -> [B, H, G*N, K]: every beam's tokens
  become queries of its input row."""
  rows, heads, tokens, head_dim = x_RHNK.shape
  if rows % batch:
    raise ValueError(f"{rows} decoded rows do not split into beams of {batch} input rows")
  x = x_RHNK.reshape(batch, rows // batch, heads, tokens, head_dim)
  return jnp.swapaxes(x, 1, 2).reshape(batch, heads, rows // batch * tokens, head_dim)


def _beams_to_rows(y_BQD, tokens: int):
  return y_BQD.reshape(-1, tokens, y_BQD.shape[-1])


class Embed(nn.Module):
  num_embeddings: int
  features: int
  axes: tuple[str, str]
  stddev: float
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(_normal(self.stddev), self.axes),
      (self.num_embeddings, self.features),
      self.param_dtype,
    )

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x_BLD):
    """Float32 logits against the embedding matrix (tied LM head)."""
    return tied_logits(x_BLD.astype(self.dtype), self.embedding.astype(self.dtype))


def head_logits(x_BLD, head_DV):
  """Logits through an LM head laid out [D, V] (float32). Decoding transposes a tied [V, D]
  embedding into this layout once per call: XLA:CPU runs x @ E^T about 1.5x slower than x @ H."""
  return jnp.einsum(
    "bld,dv->blv", x_BLD.astype(head_DV.dtype), head_DV, preferred_element_type=jnp.float32
  )


def relative_position_bucket(
  relative_position, bidirectional: bool, num_buckets: int, max_distance: int
):
  """T5's bucketing of ``memory_position - query_position`` (Mesh TensorFlow's definition)."""
  buckets = 0
  if bidirectional:
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  scaled = jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact) / math.log(
    max_distance / max_exact
  )
  if_large = max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32)
  if_large = jnp.minimum(if_large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, if_large)


class RelativePositionBias(nn.Module):
  """Per-head scalar bias from bucketed relative positions; computed once per stack."""

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  stddev: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_positions_Q, key_positions_T):
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(_normal(self.stddev), ("relpos_buckets", "heads")),
      (self.num_buckets, self.num_heads),
      self.param_dtype,
    )
    rel_QT = key_positions_T[None, :] - query_positions_Q[:, None]
    buckets_QT = relative_position_bucket(
      rel_QT, self.bidirectional, self.num_buckets, self.max_distance
    )
    bias_QTH = jnp.take(table, buckets_QT, axis=0).astype(jnp.float32)
    return jnp.transpose(bias_QTH, (2, 0, 1))[None]  # 1HQT


def key_padding_bias(key_mask_BT):
  """Additive bias hiding padded keys: 0 for real tokens, NEG_INF for padding (B11T)."""
  return jnp.where(key_mask_BT.astype(bool), 0.0, NEG_INF)[:, None, None, :].astype(jnp.float32)


def causal_bias(length: int):
  """Additive causal bias (11QQ)."""
  ok = jnp.tril(jnp.ones((length, length), dtype=bool))
  return jnp.where(ok, 0.0, NEG_INF)[None, None].astype(jnp.float32)


def segment_bias(query_segments_BQ, key_segments_BT):
  """Additive bias keeping attention inside a packed segment; segment 0 is padding."""
  same = query_segments_BQ[:, :, None] == key_segments_BT[:, None, :]
  ok = same & (key_segments_BT[:, None, :] > 0) & (query_segments_BQ[:, :, None] > 0)
  return jnp.where(ok, 0.0, NEG_INF)[:, None].astype(jnp.float32)
