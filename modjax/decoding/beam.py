"""Beam search over the cached decoder, one ``lax.while_loop``, as Hugging Face ``generate``
(transformers 5.x, ``early_stopping=False``) so results are token-identical.

Per step the top ``2*num_beams`` continuations; those ending in EOS (or reaching the length
limit) among the first ``num_beams`` join the finished pool with score
``sum_logprobs / generated_length**length_penalty``; the best ``num_beams`` unfinished ones keep
running; a row stops once its worst finished score beats the best running score normalised at
the current length.

The encoder (or prompt) runs once per input row, as in HF; then each row's cache gets one slot
per beam (``layers.add_beam_slots`` widens every ``self`` entry; the slot length is read from the
first) and ``ancestry`` (which slot holds each beam's entry at each position), which
``decode_step`` turns into its attention mask (``layers.beam_self_bias``) instead of reordering
the cache every step; ``decode_step`` then takes input rows x beams tokens, a row's beams
consecutive.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.decoding.core import NEG, DecodeResult, gather_rows, lengths, top_k
from modjax.nn.layers import add_beam_slots, decode_cache_length


@functools.partial(
  jax.jit, static_argnums=(0, 2, 5, 6, 7), static_argnames=("num_beams", "length_penalty")
)
def beam_search(
  model,
  params,
  plan,
  input_ids,
  input_mask,
  max_new,
  eos_id,
  pad_id,
  prepared,
  *,
  num_beams,
  length_penalty,
):
  """The best finished hypothesis of each input row (:class:`DecodeResult`, its score the
  length-normalised log-probability)."""
  b, k = input_ids.shape[0], num_beams
  cache, logits, index = model.start_decoding(
    params, plan, input_ids, input_mask, max_new, shared=prepared
  )
  cache, logits = _beam_slots(cache, logits, b, k)
  update = functools.partial(_update, max_new=max_new, eos_id=eos_id, length_penalty=length_penalty)
  state, tok, src = update(_initial_state(b, k, max_new, pad_id), logits, 0)
  slots = jnp.arange(k, dtype=jnp.int32)[None, :, None]

  def cond(carry):
    t, s, _, _, _ = carry
    return (t < max_new) & jnp.any(s["open"]) & ~s["all_hit"]

  def body(carry):
    t, s, cache, tok, src = carry
    position = index + t - 1
    # Each beam inherits its parent's ancestry and writes this position into its own slot.
    ancestry = jax.lax.dynamic_update_slice_in_dim(
      gather_rows(cache["ancestry"], src), jnp.broadcast_to(slots, (b, k, 1)), position, axis=2
    )
    logits, cache = model.decode_step(params, plan, dict(cache, ancestry=ancestry), tok, position)
    s, tok, src = update(s, logits, t)
    return t + 1, s, cache, tok, src

  _, state, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache, tok, src))
  tokens = state["fin_seq"][:, 0]
  return DecodeResult(tokens, lengths(tokens, eos_id), state["fin_score"][:, 0])


def _beam_slots(cache, logits_BV, b: int, k: int):
  """The cache with a slot per beam in each input row's entries (static parts stay per input
  row) and ``ancestry`` [B, K, T] (every beam's history in slot 0); the first logits per beam."""
  length = decode_cache_length(cache["self"][0], b)
  cache = dict(
    cache,
    self=tuple(add_beam_slots(layer, k) for layer in cache["self"]),
    ancestry=jnp.zeros((b, k, length), jnp.int32),
  )
  return cache, jnp.repeat(logits_BV, k, axis=0)


def _initial_state(b: int, k: int, max_new: int, pad_id: int) -> dict:
  """One running beam per row (the others at score NEG), an empty finished pool."""
  seq0 = jnp.full((b, k, max_new), pad_id, jnp.int32)
  return dict(
    run_seq=seq0,
    run_score=jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None].repeat(b, 0),
    fin_seq=seq0,
    fin_score=jnp.full((b, k), NEG),
    fin_flag=jnp.zeros((b, k), bool),
    open=jnp.ones((b,), bool),
    all_hit=jnp.bool_(False),
  )


def _update(s, logits, t, *, max_new, eos_id, length_penalty):
  """One HF beam step on logits of the running beams ([B*K, V]): the new state, the tokens the
  running beams feed next ([B*K]) and the beam each came from ([B, K])."""
  b, k = s["run_score"].shape
  v = logits.shape[-1]
  logp = (
    jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, v) + s["run_score"][:, :, None]
  )
  cand_score, cand = top_k(logp.reshape(b, k * v), 2 * k)
  cand_beam, cand_tok = cand // v, (cand % v).astype(jnp.int32)
  cand_seq = gather_rows(s["run_seq"], cand_beam).at[:, :, t].set(cand_tok)
  hits = (cand_tok == eos_id) | (t + 1 >= max_new)
  # Running beams: the best continuations that did not stop.
  run_logp = cand_score + jnp.where(hits, NEG, 0.0)
  _, keep = jax.lax.top_k(run_logp, k)
  run_seq, run_score = gather_rows(cand_seq, keep), gather_rows(run_logp, keep)
  src = gather_rows(cand_beam, keep)
  # Finished pool: the stopped ones among the first k, scored by length-normalised log-prob.
  just = hits & (jnp.arange(2 * k) < k)[None, :]
  finished = _finish(s, cand_seq, cand_score, just, t, length_penalty)
  # HF's early-stop heuristic (early_stopping=False): stop once no running beam can win.
  best_running = run_score[:, :1] / ((t + 1.0) ** length_penalty)
  worst_finished = jnp.where(
    finished["fin_flag"], jnp.min(finished["fin_score"], axis=1, keepdims=True), NEG
  )
  still_open = s["open"] & jnp.any(best_running > worst_finished, axis=1)
  new = dict(run_seq=run_seq, run_score=run_score, **finished)
  new |= dict(open=still_open, all_hit=jnp.all(hits))
  return new, run_seq[:, :, t].reshape(b * k), src


def _finish(s, cand_seq, cand_score, just, t, length_penalty) -> dict:
  """The finished pool merged with this step's stopped candidates (``just``), best k kept."""
  k = s["fin_score"].shape[1]
  fin_cand = cand_score / ((t + 1.0) ** length_penalty)
  fin_cand = fin_cand + jnp.where(s["open"][:, None] & just, 0.0, NEG)
  merged_score = jnp.concatenate([s["fin_score"], fin_cand], axis=1)
  _, best = jax.lax.top_k(merged_score, k)
  return dict(
    fin_seq=gather_rows(jnp.concatenate([s["fin_seq"], cand_seq], axis=1), best),
    fin_score=gather_rows(merged_score, best),
    fin_flag=gather_rows(jnp.concatenate([s["fin_flag"], just], axis=1), best),
  )
