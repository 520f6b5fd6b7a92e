"""Cached decoding of a MoM decoder under ``modjax.decoding``'s cache contract (greedy and beam).

``cache["self"]`` holds one self-attention cache in ``modjax.nn.layers``' layout per attention the
decoder runs, in order: a vanilla block's, and one per round of each MoM block. A round's entry
holds the routed, summed keys and values of every token, computed once (when the prompt is
prefilled or the token decoded) and read from the cache afterwards. Since every entry has the
plain layout, beam search widens them with ``add_beam_slots`` and masks through ``ancestry``
exactly as for GPT-2; ``static`` and ``shared`` are GPT-2's.

Routing is per token (a router reads that token's residual stream; the GRU state runs over that
token's rounds), so a step routes its new tokens only. The model run here is ``model.exact()``:
capacity drops depend on the other tokens of a batch, which a step does not see, and without
them a step equals the full forward. A step of B rows routes B*K (token, slot) pairs, so while
B*K < N it gathers just the chosen modules' weights (``dispatch.Gather``): the step reads K
modules per row, not the pool; with more rows it runs the pool densely.
"""

from __future__ import annotations

import jax.numpy as jnp

from modjax.core.plan import Slot
from modjax.methods.mom import modules as mods
from modjax.methods.mom.block import mom_block
from modjax.models.bank import slot_params
from modjax.nn.layers import (
  NEG_INF,
  Attention,
  Block,
  _rows_to_beams,
  _write_positions,
  beam_self_bias,
  decode_cache_from_prefill,
  decode_cache_length,
)


def _vanilla(params, name: str) -> dict:
  return {"params": slot_params(params["decoder"], Slot(name))}


def _split_qkv(qkv_BL3HK):
  """(q, k, v), each [B, H, L, K]."""
  return tuple(jnp.swapaxes(qkv_BL3HK[:, :, i], 1, 2) for i in range(3))


def _prefill(model, params, x_BPD, bias, mask_BP, total: int):
  """(hidden states, caches): the prompt through every layer, each attention's keys and values
  kept in a cache of ``total`` positions."""
  spec, caches = model.block_spec(), []
  for kind, where in model.mom.positions():
    if kind == "block":
      x_BPD, k, v = Block(spec).apply(_vanilla(params, where), x_BPD, bias, method="prefill")
      caches.append(decode_cache_from_prefill(k, v, total))
      continue
    kept = []

    def attend(r, qkv_BL3HK, kept=kept):
      _, k, v = _split_qkv(qkv_BL3HK)
      kept.append(decode_cache_from_prefill(k, v, total))
      return mods.attention_context(spec, qkv_BL3HK, bias, deterministic=True)

    x_BPD, _, _ = mom_block(
      spec, model.mom, params["decoder"], where, x_BPD, bias, mask_BP, attend=attend
    )
    caches += kept
  return x_BPD, caches


def start_decoding(model, params, prompt_ids_BP, prompt_mask_BP, max_new_tokens: int, shared):
  """GPT-2's ``start_decoding`` for a MoM decoder: (cache, logits of the first new token BV,
  index of the next cache position); the prompt is left-padded, positions ``cumsum(mask) - 1``."""
  gpt2 = model.gpt2
  x, bias, prompt_mask_BP, total = gpt2.prompt_inputs(
    params, prompt_ids_BP, prompt_mask_BP, max_new_tokens
  )
  x, caches = _prefill(model, params, x, bias, prompt_mask_BP.astype(jnp.float32), total)
  return gpt2.first_token(params, x, caches, prompt_mask_BP, max_new_tokens, shared)


def _cached_attention(spec, layer_cache, qkv_RN3HK, index, self_bias):
  """(context_RNHK, cache): R = B*G rows' N new tokens written at ``index`` of their beam slots
  (as ``layers.Block.decode_step`` writes them), then attending over the cache."""
  rows, tokens = qkv_RN3HK.shape[:2]
  batch = layer_cache["k"].shape[0]
  q, k_new, v_new = (_rows_to_beams(a, batch) for a in _split_qkv(qkv_RN3HK))  # BH(GN)K
  length = decode_cache_length(layer_cache, rows)
  k, v = layer_cache["k"], layer_cache["v"]
  k_new, v_new = jnp.swapaxes(k_new, 2, 3).astype(k.dtype), v_new.astype(v.dtype)
  for slot in range(rows // batch):
    at, new = slot * length + index, slice(slot * tokens, (slot + 1) * tokens)
    k = _write_positions(k, k_new[..., new], at, axis=3)
    v = _write_positions(v, v_new[:, :, new], at, axis=2)
  ctx_BQHK, _ = Attention(spec).apply(
    {"params": {}}, q, k, v, self_bias, True, keys_transposed=True, method="context"
  )
  return ctx_BQHK.reshape((rows, tokens) + ctx_BQHK.shape[2:]), dict(layer_cache, k=k, v=v)


def _step_bias(cache, tokens: int, index):
  """[B, 1, G*N, G*T] self-attention bias of N new tokens per row at ``index`` (GPT-2's)."""
  static = cache["static"]
  query_idx = jnp.asarray(index, jnp.int32)[..., None] + jnp.arange(tokens)  # [N] or [B, N]
  keys = jnp.arange(static["key_mask"].shape[1])
  ok = static["key_mask"][:, None, :] & (keys <= query_idx[..., None])  # [B, N, T]
  bias = jnp.where(ok, 0.0, NEG_INF)[:, None].astype(jnp.float32)
  return beam_self_bias(bias, cache.get("ancestry")), query_idx


def decode_tokens(model, params, cache, token_ids_BN, index):
  """GPT-2's ``decode_tokens`` for a MoM decoder: logits (float32, BNV) of N new tokens per row
  at cache positions ``index`` .. ``index + N - 1`` and the cache with their keys and values
  written, one entry per vanilla block and per MoM round (module docstring)."""
  spec, cfg, gpt2 = model.block_spec(), model.mom, model.gpt2
  rows, n = token_ids_BN.shape
  if n > 1 and cache.get("ancestry") is not None:
    raise ValueError("decode_tokens scores several tokens per row only for greedy caches")
  static = cache["static"]
  bias, query_idx = _step_bias(cache, n, index)
  beams = rows // static["key_mask"].shape[0]
  positions = jnp.repeat(static["position_offset"], beams)[:, None] + query_idx
  x = gpt2._embed(params, token_ids_BN, positions)
  caches, at = list(cache["self"]), 0
  for kind, where in cfg.positions():
    if kind == "block":
      x, caches[at] = Block(spec).apply(
        _vanilla(params, where), x, caches[at], index, bias, method="decode_step"
      )
      at += 1
      continue
    first = at

    def attend(r, qkv_RN3HK, first=first):
      ctx, caches[first + r] = _cached_attention(spec, caches[first + r], qkv_RN3HK, index, bias)
      return ctx

    x, _, _ = mom_block(
      spec, cfg, params["decoder"], where, x, None, jnp.ones((rows, n)), attend=attend
    )
    at += cfg.rounds
  logits = gpt2._logits(params, x, cache["shared"]["head_DV"])
  return logits, dict(cache, self=tuple(caches))
