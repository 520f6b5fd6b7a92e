"""Cached greedy, sampled and beam-search decoding for any architecture and plan, fully jitted.

An architecture provides ``start_decoding(params, plan, ids, mask, max_new_tokens)`` -> (cache,
first logits, next cache index) and ``decode_step(params, plan, cache, tokens, index)`` -> (logits,
cache). The cache has three parts: ``self`` (a tuple with one entry per self-attention the model
runs, a plan slot or a Mixture-of-Modules round, each in ``layers.empty_decode_cache``'s layout:
keys/values per input row, written in place), ``static`` (per input row: cross-attention
keys/values, masks) and ``shared`` (no batch axis). Beam search starts decoding once per input
row (the encoder runs once, as in HF), then gives each row's cache one slot per beam (it widens
every ``self`` entry with ``layers.add_beam_slots`` and reads the slot length from the first)
and adds ``ancestry`` (which slot holds each beam's entry at each position), which
``decode_step`` turns into its attention mask (``layers.beam_self_bias``), instead of reordering
the cache every step; ``decode_step`` then takes input rows x beams tokens, a row's beams
consecutive. The whole loop is one ``lax.while_loop``: no Python per token. A model that runs a
structure of its own instead of a plan checks the plan itself (:func:`validate_plan`).
``generate(..., draft_plan=...)`` decodes greedily by self-speculation instead
(:mod:`modjax.speculative`: same tokens, fewer full-plan steps).

Semantics follow Hugging Face ``generate`` (transformers 5.x) so results are token-identical:

* greedy: argmax; rows that emitted EOS are padded with ``pad_id``; stops when every row is done
  or after ``max_new_tokens``. Sampling (``sampling=``, :mod:`modjax.sampling`) is the same loop
  with a draw from the warped distribution (temperature, top-k, top-p) in place of the argmax.
* beam search: per step the top ``2*num_beams`` continuations; those ending in EOS (or reaching
  the length limit) among the first ``num_beams`` join the finished pool with score
  ``sum_logprobs / generated_length**length_penalty``; the best ``num_beams`` unfinished ones keep
  running; a row stops once its worst finished score beats the best running score normalised at
  the current length (HF's ``early_stopping=False`` heuristic).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from modjax.layers import add_beam_slots, decode_cache_length
from modjax.plan import Plan
from modjax.sampling import Sampling, sample

_NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class DecodeResult:
  tokens: Any  # [B, max_new_tokens], pad_id after the end
  lengths: Any  # [B], generated tokens including EOS
  scores: Any  # [B], beam score (length-normalised log-prob); greedy: summed log-prob
  stats: Any = None  # speculative decoding: a modjax.speculative.SpeculativeStats


jax.tree_util.register_dataclass(
  DecodeResult, data_fields=["tokens", "lengths", "scores", "stats"], meta_fields=[]
)


def generate(
  model,
  params,
  plan: Plan,
  input_ids,
  input_mask=None,
  *,
  max_new_tokens: int,
  num_beams: int = 1,
  eos_id: int | None = None,
  pad_id: int | None = None,
  length_penalty: float = 1.0,
  prepared=None,
  draft_plan: Plan | None = None,
  draft_tokens: int = 4,
  sampling: Sampling | None = None,
  rng=None,
) -> DecodeResult:
  """Decodes a batch. ``input_ids`` are T5 encoder inputs, or left-padded GPT-2 prompts.

  ``sampling``: draw each token (:class:`modjax.sampling.Sampling`: temperature, top-k, top-p)
  with the key ``rng`` instead of taking the argmax; ``scores`` stay the summed log-probabilities
  of the chosen tokens under the model's own (unwarped) distribution.

  ``prepared``: :func:`prepare` of these weights, when decoding them repeatedly (otherwise
  each call derives those constants itself). ``draft_plan``: greedy self-speculative decoding
  with that plan of the same bank drafting ``draft_tokens`` per round
  (:func:`modjax.speculative.speculative_generate`; same tokens, ``stats`` filled in).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  if sampling is not None:
    _check_sampling(sampling, rng, num_beams, draft_plan)
  if draft_plan is not None:
    if num_beams != 1:
      raise ValueError("draft_plan= is for greedy decoding; beam search stays plain (num_beams=1)")
    from modjax.speculative import speculative_generate  # it imports this module

    return speculative_generate(
      model,
      params,
      plan,
      input_ids,
      input_mask,
      draft_plan=draft_plan,
      draft_tokens=draft_tokens,
      max_new_tokens=max_new_tokens,
      eos_id=eos_id,
      pad_id=pad_id,
      prepared=prepared,
    )
  input_mask, eos_id, pad_id = resolve_ids(model, input_ids, input_mask, eos_id, pad_id)
  fn = (
    functools.partial(_greedy, sampling=sampling, rng=rng)
    if num_beams == 1
    else functools.partial(_beam, num_beams=num_beams, length_penalty=length_penalty)
  )
  validate_plan(model, params, plan)
  if prepared is not None:
    _check_prepared(model, params, prepared)
  return fn(model, params, plan, input_ids, input_mask, max_new_tokens, eos_id, pad_id, prepared)


def _check_sampling(sampling, rng, num_beams: int, draft_plan) -> None:
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling= takes a modjax.sampling.Sampling, got {type(sampling).__name__}")
  if rng is None:
    raise ValueError("sampling= needs rng=jax.random.key(seed)")
  if num_beams != 1 or draft_plan is not None:
    raise ValueError("sampling= draws one sequence per row: use num_beams=1 and no draft_plan")


def validate_plan(model, params, plan: Plan) -> Plan:
  """``plan`` checked against the bank; a model that runs a structure of its own rather than a
  plan (Mixture-of-Modules) checks it with its ``check_plan``."""
  check = getattr(model, "check_plan", None)
  return plan.validate(params, model.stacks) if check is None else check(plan, params)


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


@functools.partial(jax.jit, static_argnums=0)
def prepare(model, params):
  """Decoding constants of a set of weights (today: the tied LM head transposed to [D, V]),
  computed once and passed to :func:`generate` as ``prepared=`` across calls, as a serving
  process lays its weights out once at load. Valid only for these ``params``: ``generate``
  checks shapes and dtypes, not values."""
  return model.decoding_constants(params)


def _check_prepared(model, params, prepared):
  want = jax.eval_shape(model.decoding_constants, params)
  got = jax.eval_shape(lambda x: x, prepared)
  if jax.tree.structure(got) != jax.tree.structure(want) or any(
    (a.shape, a.dtype) != (b.shape, b.dtype)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  ):
    shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)), want)
    raise ValueError(
      f"prepared= does not match these weights (expected {shapes}); "
      "pass decode.prepare(model, params) of the same model and params"
    )


@functools.partial(jax.jit, static_argnums=(0, 2, 5, 6, 7), static_argnames=("sampling",))
def _greedy(
  model, params, plan, input_ids, input_mask, max_new, eos_id, pad_id, prepared, sampling, rng
):
  """Greedy decoding, or sampling with ``sampling`` and the key ``rng`` (a draw per step)."""
  b = input_ids.shape[0]
  cache, logits, index = model.start_decoding(
    params, plan, input_ids, input_mask, max_new, shared=prepared
  )

  def pick(logits, done, tokens, score, t):
    if sampling is None:
      tok = _argmax(logits)
    else:
      tok = sample(logits, jax.random.fold_in(rng, t), sampling)
    logp = jnp.take_along_axis(logits, tok[:, None], 1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
    score = score + jnp.where(done, 0.0, logp)
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
  return DecodeResult(tokens, _lengths(tokens, eos_id), score)


def _argmax(logits_BV):
  """First index of the maximum, as ``jnp.argmax``; XLA:CPU runs max + where about 4x faster
  than its variadic argmax reduction, which matters once per generated token."""
  vocab = logits_BV.shape[-1]
  is_max = logits_BV == jnp.max(logits_BV, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(is_max, jnp.arange(vocab), vocab), axis=-1)
  return jnp.minimum(first, vocab - 1).astype(jnp.int32)  # an all-NaN row gives no maximum


def _top_k(x_RN, k: int, chunk: int = 128):
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


def _lengths(tokens, eos_id):
  """Generated length: up to and including the first EOS, else all ``max_new_tokens``.

  A row without EOS always ran to the limit (greedy stops early only once every row has emitted
  EOS; a beam hypothesis finishes only on EOS or at the limit). Counting non-pad tokens instead
  would undercount rows that generate the pad token as an ordinary token.
  """
  is_eos = tokens == eos_id
  first_eos = jnp.argmax(is_eos, axis=1)
  return jnp.where(is_eos.any(1), first_eos + 1, tokens.shape[1]).astype(jnp.int32)


def _gather(x, idx):
  """x[b, idx[b, j], ...] for a [B, N, ...] array and [B, M] indices."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(
  jax.jit, static_argnums=(0, 2, 5, 6, 7), static_argnames=("num_beams", "length_penalty")
)
def _beam(
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
  b, k = input_ids.shape[0], num_beams
  cache, logits, index = model.start_decoding(
    params, plan, input_ids, input_mask, max_new, shared=prepared
  )
  # Each input row's cache gets a slot per beam; static parts stay per input row. Beams never
  # move cache entries: ``ancestry`` tracks which slot holds each beam's history.
  length = decode_cache_length(cache["self"][0], b)
  cache = dict(
    cache,
    self=tuple(add_beam_slots(layer, k) for layer in cache["self"]),
    ancestry=jnp.zeros((b, k, length), jnp.int32),
  )
  logits = jnp.repeat(logits, k, axis=0)
  top_mask = jnp.arange(2 * k) < k
  slots = jnp.arange(k, dtype=jnp.int32)[None, :, None]

  def update(s, logits, t):
    """One HF beam step on logits of the running beams; returns the new state and its tokens."""
    v = logits.shape[-1]
    logp = (
      jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, v) + s["run_score"][:, :, None]
    )
    cand_score, cand = _top_k(logp.reshape(b, k * v), 2 * k)
    cand_beam, cand_tok = cand // v, (cand % v).astype(jnp.int32)
    cand_seq = _gather(s["run_seq"], cand_beam).at[:, :, t].set(cand_tok)
    hits = (cand_tok == eos_id) | (t + 1 >= max_new)
    # Running beams: the best continuations that did not stop.
    run_logp = cand_score + jnp.where(hits, _NEG, 0.0)
    _, keep = jax.lax.top_k(run_logp, k)
    run_seq, run_score, src = (
      _gather(cand_seq, keep),
      _gather(run_logp, keep),
      _gather(cand_beam, keep),
    )
    # Finished pool: the stopped ones among the first k, scored by length-normalised log-prob.
    just = hits & top_mask[None, :]
    fin_cand = cand_score / ((t + 1.0) ** length_penalty)
    fin_cand = fin_cand + jnp.where(s["open"][:, None] & just, 0.0, _NEG)
    merged_score = jnp.concatenate([s["fin_score"], fin_cand], axis=1)
    _, best = jax.lax.top_k(merged_score, k)
    fin_seq = _gather(jnp.concatenate([s["fin_seq"], cand_seq], axis=1), best)
    fin_flag = _gather(jnp.concatenate([s["fin_flag"], just], axis=1), best)
    fin_score = _gather(merged_score, best)
    # HF's early-stop heuristic (early_stopping=False): stop once no running beam can win.
    best_running = run_score[:, :1] / ((t + 1.0) ** length_penalty)
    worst_finished = jnp.where(fin_flag, jnp.min(fin_score, axis=1, keepdims=True), _NEG)
    still_open = s["open"] & jnp.any(best_running > worst_finished, axis=1)
    new = dict(
      run_seq=run_seq,
      run_score=run_score,
      fin_seq=fin_seq,
      fin_score=fin_score,
      fin_flag=fin_flag,
      open=still_open,
      all_hit=jnp.all(hits),
    )
    return new, run_seq[:, :, t].reshape(b * k), src

  seq0 = jnp.full((b, k, max_new), pad_id, jnp.int32)
  state = dict(
    run_seq=seq0,
    run_score=jnp.where(jnp.arange(k) == 0, 0.0, _NEG)[None].repeat(b, 0),
    fin_seq=seq0,
    fin_score=jnp.full((b, k), _NEG),
    fin_flag=jnp.zeros((b, k), bool),
    open=jnp.ones((b,), bool),
    all_hit=jnp.bool_(False),
  )
  state, tok, src = update(state, logits, 0)

  def cond(carry):
    t, s, _, _, _ = carry
    return (t < max_new) & jnp.any(s["open"]) & ~s["all_hit"]

  def body(carry):
    t, s, cache, tok, src = carry
    position = index + t - 1
    # Each beam inherits its parent's ancestry and writes this position into its own slot.
    ancestry = jax.lax.dynamic_update_slice_in_dim(
      _gather(cache["ancestry"], src), jnp.broadcast_to(slots, (b, k, 1)), position, axis=2
    )
    logits, cache = model.decode_step(params, plan, dict(cache, ancestry=ancestry), tok, position)
    s, tok, src = update(s, logits, t)
    return t + 1, s, cache, tok, src

  _, state, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache, tok, src))
  tokens = state["fin_seq"][:, 0]
  return DecodeResult(tokens, _lengths(tokens, eos_id), state["fin_score"][:, 0])
