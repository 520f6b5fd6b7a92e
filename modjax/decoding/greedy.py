"""Greedy decoding, and sampling in the same loop: one ``lax.while_loop`` of one-token steps.

As Hugging Face ``generate`` (transformers 5.x): argmax (or a draw from the warped distribution,
:mod:`.sampling`); rows that emitted EOS are padded with ``pad_id``; the loop stops when every
row is done or after ``max_new_tokens``. ``scores=False`` skips the log-softmax a step spends
on the chosen token's log-probability (the result's ``scores`` are then None).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.decoding.core import DecodeResult, argmax, lengths, log_prob
from modjax.decoding.sampling import sample


@functools.partial(jax.jit, static_argnums=(0, 2, 5, 6, 7), static_argnames=("sampling", "scores"))
def greedy(
  model,
  params,
  plan,
  input_ids,
  input_mask,
  max_new,
  eos_id,
  pad_id,
  prepared,
  sampling,
  rng,
  scores: bool = True,
):
  """Greedy decoding, or sampling with ``sampling`` and the key ``rng`` (a draw per step);
  ``scores``: sum each row's log-probabilities of its tokens."""
  b = input_ids.shape[0]
  cache, logits, index = model.start_decoding(
    params, plan, input_ids, input_mask, max_new, shared=prepared
  )

  def pick(logits, done, tokens, score, t):
    if sampling is None:
      tok = argmax(logits)
    else:
      tok = sample(logits, jax.random.fold_in(rng, t), sampling)
    if scores:
      score = score + jnp.where(done, 0.0, log_prob(logits, tok))
    tok = jnp.where(done, pad_id, tok)
    return tok, done | (tok == eos_id), tokens.at[:, t].set(tok), score

  tokens = jnp.full((b, max_new), pad_id, jnp.int32)
  tok, done, tokens, score = pick(logits, jnp.zeros((b,), bool), tokens, jnp.zeros((b,)), 0)

  def cond(state):
    t, _, _, done, _, _ = state
    return (t < max_new) & ~jnp.all(done)

  def body(state):
    t, cache, tok, done, tokens, score = state
    logits, cache = model.decode_step(params, plan, cache, tok, index + t - 1)
    tok, done, tokens, score = pick(logits, done, tokens, score, t)
    return t + 1, cache, tok, done, tokens, score

  _, _, _, _, tokens, score = jax.lax.while_loop(
    cond, body, (jnp.int32(1), cache, tok, done, tokens, score)
  )
  return DecodeResult(tokens, lengths(tokens, eos_id), score if scores else None)
