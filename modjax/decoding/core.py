"""What every decoding loop shares: the result type, argument defaults and checks, the prepared
constants of a set of weights, and the per-token primitives (argmax, chunked top-k, the log-prob
of a chosen token, generated lengths, a gather along beams).

An architecture provides ``start_decoding(params, plan, ids, mask, max_new_tokens)`` -> (cache,
first logits, next cache index) and ``decode_step(params, plan, cache, tokens, index)`` -> (logits,
cache); :mod:`.speculative` also uses ``decode_tokens`` (several tokens per row). The cache has
three parts: ``self`` (a tuple with one entry per self-attention the model runs, a plan slot or a
Mixture-of-Modules round, each in ``layers.empty_decode_cache``'s layout: keys/values per input
row, written in place), ``static`` (per input row: cross-attention keys/values, masks) and
``shared`` (no batch axis). A model that runs a structure of its own instead of a plan checks
the plan itself (:func:`validate_plan`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from modjax.core.plan import Plan

NEG = -1.0e9  # score of a hypothesis that must never be chosen


@dataclasses.dataclass(frozen=True)
class DecodeResult:
  tokens: Any  # [B, max_new_tokens], pad_id after the end
  lengths: Any  # [B], generated tokens including EOS
  scores: Any  # [B], beam score (length-normalised log-prob); greedy: summed log-prob
  stats: Any = None  # speculative decoding: a modjax.decoding.SpeculativeStats


jax.tree_util.register_dataclass(
  DecodeResult, data_fields=["tokens", "lengths", "scores", "stats"], meta_fields=[]
)


# ---- arguments ------------------------------------------------------------------------------
def check_max_new_tokens(max_new_tokens: int) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def validate_plan(model, params, plan: Plan) -> Plan:
  """``plan`` checked against the bank by the model (``Architecture.check_plan``: a
  Mixture-of-Modules model runs its own structure and takes only the empty plan)."""
  return model.check_plan(plan, params)


def resolve_ids(model, input_ids, input_mask, eos_id, pad_id):
  """``(input_mask, eos_id, pad_id)`` with the defaults filled in: every position attended,
  the model's EOS, its pad id (else the EOS)."""
  cfg = model.config
  eos_id = cfg.eos_token_id if eos_id is None else eos_id
  if pad_id is None:
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else eos_id
  if input_mask is None:
    input_mask = jnp.ones_like(input_ids)
  return input_mask, eos_id, pad_id


# ---- constants of a set of weights ----------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def prepare(model, params):
  """Decoding constants of a set of weights (today: the tied LM head transposed to [D, V]),
  computed once and passed to ``generate`` as ``prepared=`` across calls, as a serving
  process lays its weights out once at load. Valid only for these ``params``: ``generate``
  checks shapes and dtypes, not values."""
  return model.decoding_constants(params)


def check_prepared(model, params, prepared) -> None:
  """Refuses ``prepared`` constants whose structure, shapes or dtypes differ from what
  :func:`prepare` gives for ``params``."""
  want = jax.eval_shape(model.decoding_constants, params)
  got = jax.eval_shape(lambda x: x, prepared)
  if jax.tree.structure(got) != jax.tree.structure(want) or any(
    (a.shape, a.dtype) != (b.shape, b.dtype)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  ):
    shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)), want)
    raise ValueError(
      f"prepared= does not match these weights (expected {shapes}); "
      "pass decoding.prepare(model, params) of the same model and params"
    )


# ---- per-token primitives -------------------------------------------------------------------
def argmax(logits_BV):
  """First index of the maximum over the last axis, as ``jnp.argmax``; XLA:CPU runs max + where
  about 4x faster than its variadic argmax reduction, which matters once per generated token."""
  vocab = logits_BV.shape[-1]
  is_max = logits_BV == jnp.max(logits_BV, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(is_max, jnp.arange(vocab), vocab), axis=-1)
  return jnp.minimum(first, vocab - 1).astype(jnp.int32)  # an all-NaN row gives no maximum


def log_prob(logits, token):
  """log softmax(logits)[token] over the last axis: the score of a chosen token."""
  chosen = jnp.take_along_axis(logits, token[..., None], axis=-1)[..., 0]
  return chosen - jax.nn.logsumexp(logits, axis=-1)


def top_k(x_RN, k: int, chunk: int = 128):
  """``jax.lax.top_k`` over the last axis, same values and indices (ties go to the lower index),
  for long rows: the k largest lie in the k chunks with the largest maxima.

  XLA:CPU's TopK sorts candidates on one thread: ~1.5 ms for beam search's 8 rows of 4*32128
  log-probs, every step. Here one pass takes chunk maxima, the small top-k picks k chunks, and a
  top-k over their k*chunk entries finishes. An element among the k largest has fewer than k
  elements above it, so fewer than k chunks rank above its own (each holds one of them; equal
  maxima rank by chunk, i.e. by index). Picked chunks are sorted so candidate order is index
  order, which keeps lax.top_k's tie-breaking.
  """
  n = x_RN.shape[-1]
  if n <= 4 * k * chunk:
    return jax.lax.top_k(x_RN, k)
  num_chunks = -(-n // chunk)
  if num_chunks * chunk != n:  # pad with -inf: a pad index is never above a real entry
    pad = [(0, 0)] * (x_RN.ndim - 1) + [(0, num_chunks * chunk - n)]
    x_RN = jnp.pad(x_RN, pad, constant_values=-jnp.inf)
  chunks = x_RN.reshape(*x_RN.shape[:-1], num_chunks, chunk)
  _, picked = jax.lax.top_k(jnp.max(chunks, axis=-1), k)
  picked = jnp.sort(picked, axis=-1)
  candidates = jnp.take_along_axis(chunks, picked[..., None], axis=-2)
  values, where = jax.lax.top_k(candidates.reshape(*picked.shape[:-1], k * chunk), k)
  index = jnp.take_along_axis(picked, where // chunk, axis=-1) * chunk + where % chunk
  return values, index.astype(jnp.int32)


def lengths(tokens, eos_id):
  """Generated length: up to and including the first EOS, else all ``max_new_tokens``.

  A row without EOS always ran to the limit (greedy stops early only once every row has emitted
  EOS; a beam hypothesis finishes only on EOS or at the limit). Counting non-pad tokens instead
  would undercount rows that generate the pad token as an ordinary token.
  """
  is_eos = tokens == eos_id
  first_eos = jnp.argmax(is_eos, axis=1)
  return jnp.where(is_eos.any(1), first_eos + 1, tokens.shape[1]).astype(jnp.int32)


def gather_rows(x, idx):
  """x[b, idx[b, j], ...] for a [B, N, ...] array and [B, M] indices."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
