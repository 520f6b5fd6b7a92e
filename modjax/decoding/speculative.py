"""Greedy self-speculative decoding: a cheaper plan of the same bank drafts, the full plan checks.

A bank holds modules at several granularities, so any smaller plan of it (fewer layers, coarse
modules) is a draft model that shares the full model's embeddings, LM head and, for T5, its
encoder output. Each round, per row:

1. the draft plan decodes ``k = draft_tokens`` tokens greedily with its own cache;
2. the full plan scores the pending token and the k drafts in ONE multi-token decoder step
   (``model.decode_tokens``), writing their keys/values into its cache;
3. the longest prefix of drafts the full plan agrees with is accepted, plus the full plan's own
   next token (so every round emits at least one token);
4. both caches "roll back" to the accepted length by moving the row's position only: every query
   sees its cache up to its own position and nothing after it, so entries of rejected drafts
   are never read, and the next round overwrites them.

Every emitted token is the full plan's argmax given the emitted tokens before it, so the output
is that of plain greedy decoding of the full plan (:mod:`.greedy`), token for token, whatever
the draft; a better draft only makes rounds emit more tokens.

Rows advance independently: each has its own position in both caches (cache writes become
per-row scatters, masks and T5's relative-position bias per-row), so a row that accepts k tokens
never waits for one that accepts none. Lock-step at the batch's minimum would save only those
scatters (the matmuls are the same) while discarding, every round, the tokens the other rows
accepted beyond the worst row's (speed of the two not measured here). At batch 1 the one row's
position is a scalar (``layers.one_row_index``): single in-place writes, one bias row. The
draft's cache lacks the last draft token's entry when all k were accepted, so a round after
such a one starts with a two-token draft step that re-feeds the token before the pending one
with it; other rounds feed the pending token alone (a ``lax.cond`` on the batch). Without
``scores`` the verification takes no log-softmax over its k+1 positions.

An architecture provides, beyond what greedy decoding uses, ``decode_tokens(params, plan,
cache, token_ids_BN, index)`` (N tokens per row; ``index`` a scalar or [B]) and, for
encoder-decoders, ``encode`` and ``start_decoding(..., encoded=)``.

The whole generation is one jitted ``lax.while_loop`` (the k draft steps a ``lax.scan``). T5
runs its encoder once, under the full plan, and the draft decoder computes its cross-attention
keys/values from that output (``draft_encoder=True`` runs the draft plan's own encoder instead).
Finished rows keep riding along (static shapes) without changing their outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from modjax.core.plan import Plan
from modjax.decoding.core import (
  DecodeResult,
  argmax,
  check_max_new_tokens,
  check_prepared,
  lengths,
  log_prob,
  resolve_ids,
)


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
  """Per-row counts of one speculative generation ([B] arrays)."""

  rounds: Any  # draft-and-verify rounds the row took part in before it finished
  drafted: Any  # draft tokens proposed to the row (draft_tokens per round)
  accepted: Any  # of those, how many the full plan agreed with (before EOS/length cut-off)

  @property
  def acceptance_rate(self) -> float:
    """Accepted over drafted tokens, whole batch."""
    return float(jnp.sum(self.accepted) / jnp.maximum(jnp.sum(self.drafted), 1))

  @property
  def mean_accepted_length(self) -> float:
    """Draft tokens accepted per round, whole batch (each round also emits one token of the
    full plan's)."""
    return float(jnp.sum(self.accepted) / jnp.maximum(jnp.sum(self.rounds), 1))

  def as_dict(self) -> dict:
    return {
      "rounds": int(jnp.sum(self.rounds)),
      "drafted": int(jnp.sum(self.drafted)),
      "accepted": int(jnp.sum(self.accepted)),
      "acceptance_rate": self.acceptance_rate,
      "mean_accepted_length": self.mean_accepted_length,
    }


jax.tree_util.register_dataclass(
  SpeculativeStats, data_fields=["rounds", "drafted", "accepted"], meta_fields=[]
)


def speculative_generate(
  model,
  params,
  plan: Plan,
  input_ids,
  input_mask=None,
  *,
  draft_plan: Plan,
  draft_tokens: int = 4,
  max_new_tokens: int,
  eos_id: int | None = None,
  pad_id: int | None = None,
  prepared=None,
  draft_encoder: bool = False,
  scores: bool = True,
) -> DecodeResult:
  """Greedy decoding of ``plan`` with ``draft_plan`` (same bank) drafting ``draft_tokens`` per
  round. Returns plain greedy's :class:`DecodeResult` with ``stats`` a :class:`SpeculativeStats`
  (``scores`` None unless ``scores``).

  For T5 the draft plan's encoder is ignored (and may be empty) unless ``draft_encoder``.
  """
  check_max_new_tokens(max_new_tokens)
  if not isinstance(draft_tokens, int) or draft_tokens < 1:
    raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
  if not isinstance(draft_plan, Plan):
    raise ValueError(f"draft_plan must be a modjax.core.plan.Plan, got {type(draft_plan).__name__}")
  input_mask, eos_id, pad_id = resolve_ids(model, input_ids, input_mask, eos_id, pad_id)
  plan.validate(params, model.stacks)
  if "encoder" in model.stacks and not draft_encoder:
    draft_plan = Plan(encoder=(), decoder=draft_plan.decoder)
    Plan(encoder=plan.encoder, decoder=draft_plan.decoder).validate(params, model.stacks)
  else:
    draft_plan.validate(params, model.stacks)
  limit = getattr(model.config, "n_positions", None)
  room = max_new_tokens + draft_tokens + 1  # cache positions past the prompt a round may write
  if limit is not None and input_ids.shape[1] + room > limit:
    raise ValueError(
      f"prompt ({input_ids.shape[1]}) + new tokens ({max_new_tokens}) + a drafted block "
      f"({draft_tokens + 1}) exceed n_positions={limit}; lower max_new_tokens or draft_tokens"
    )
  if prepared is not None:
    check_prepared(model, params, prepared)
  return _speculative(
    model,
    params,
    plan,
    draft_plan,
    input_ids,
    input_mask,
    max_new_tokens,
    draft_tokens,
    eos_id,
    pad_id,
    draft_encoder,
    prepared,
    scores,
  )


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 6, 7, 8, 9, 10, 12))
def _speculative(
  model,
  params,
  plan,
  draft_plan,
  ids,
  mask,
  max_new,
  k,
  eos_id,
  pad_id,
  draft_encoder,
  prepared,
  scores,
):
  b = ids.shape[0]
  shared = model.decoding_constants(params) if prepared is None else prepared
  full_kw, draft_kw = {}, {}
  if "encoder" in model.stacks:
    encoded, _ = model.encode(params, plan, ids, input_mask_BS=mask)
    full_kw = {"encoded": encoded}
    draft_kw = {} if draft_encoder else full_kw
  room = max_new + k + 1
  full, logits, index = model.start_decoding(params, plan, ids, mask, room, shared, **full_kw)
  draft, _, _ = model.start_decoding(params, draft_plan, ids, mask, room, shared, **draft_kw)
  # The first token comes from the prefill / start step, as in plain greedy decoding.
  first = argmax(logits)
  before = (
    jnp.full((b,), model.config.decoder_start_token_id, jnp.int32)
    if "encoder" in model.stacks
    else ids[:, -1].astype(jnp.int32)
  )
  zeros = jnp.zeros((b,), jnp.int32)
  state = dict(
    n=jnp.ones((b,), jnp.int32),  # tokens emitted; the last one (pending) is not cached yet
    pending=first,
    before=before,  # the token cached just before the pending one (but see refeed)
    refeed=jnp.zeros((b,), bool),  # the draft cache lacks before's entry: all drafts accepted
    done=(first == eos_id) | (max_new <= 1),
    tokens=jnp.full((b, room), pad_id, jnp.int32).at[:, 0].set(first),
    score=log_prob(logits, first) if scores else jnp.zeros((b,)),
    full=full,
    draft=draft,
    stats=SpeculativeStats(zeros, zeros, zeros),
  )

  def body(s):
    return _round(model, params, plan, draft_plan, s, index, max_new, k, eos_id, pad_id, scores)

  state = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), body, state)
  tokens = state["tokens"][:, :max_new]
  score = state["score"] if scores else None
  return DecodeResult(tokens, lengths(tokens, eos_id), score, state["stats"])


def _round(model, params, plan, draft_plan, s, index, max_new, k, eos_id, pad_id, scores):
  """One draft-and-verify round for every row still generating."""
  active = ~s["done"]
  position = index + s["n"] - 1  # [B] cache position of each row's pending token
  drafts_BK, draft = draft_block(model, params, draft_plan, s["draft"], s, position, k)
  block_BN = jnp.concatenate([s["pending"][:, None], drafts_BK], axis=1)  # N = k + 1
  logits_BNV, full = model.decode_tokens(params, plan, s["full"], block_BN, position)
  best_BN = argmax(logits_BNV)  # the full plan's next token after each prefix of the block
  agreed = jnp.sum(jnp.cumprod(drafts_BK == best_BN[:, :k], axis=1), axis=1)
  # Emitted: the agreed drafts plus the full plan's next token (all equal to best_BN's first
  # agreed + 1 entries), cut at the first EOS and at max_new_tokens.
  j = jnp.arange(k + 1)
  is_eos = best_BN == eos_id
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
  keep = (
    active[:, None] & (j <= agreed[:, None]) & (j < (max_new - s["n"])[:, None]) & (eos_before == 0)
  )
  count = jnp.sum(keep, axis=1)
  write = functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=0)
  tokens = jax.vmap(write)(s["tokens"], jnp.where(keep, best_BN, pad_id), s["n"])
  score = s["score"]
  if scores:
    score = score + jnp.sum(jnp.where(keep, log_prob(logits_BNV, best_BN), 0.0), axis=1)
  n = s["n"] + count
  seq = jnp.concatenate([s["pending"][:, None], best_BN], axis=1)  # seq[i]: emitted i-th now

  def pick(i_B):
    return jnp.take_along_axis(seq, i_B[:, None], axis=1)[:, 0]

  moved = count > 0  # every active row emits at least one token
  done = s["done"] | jnp.any(keep & is_eos, axis=1) | (n >= max_new)
  stats = s["stats"]
  return dict(
    n=n,
    pending=jnp.where(moved, pick(count), s["pending"]),
    before=jnp.where(moved, pick(jnp.maximum(count - 1, 0)), s["before"]),
    refeed=(count == k + 1) & ~done,
    done=done,
    tokens=tokens,
    score=score,
    full=full,
    draft=draft,
    stats=SpeculativeStats(
      stats.rounds + active,
      stats.drafted + k * active,
      stats.accepted + jnp.where(active, agreed, 0),
    ),
  )


def draft_block(model, params, draft_plan, cache, s, position, k):
  """k greedy tokens of the draft plan after each row's pending token (``s["pending"]`` at
  ``position``). Where ``s["refeed"]`` marks a row whose draft cache lacks the entry of the token
  before the pending one (the previous round accepted every draft: the draft never fed its own
  last token), the first step feeds that token (``s["before"]``) too, for the whole batch."""

  def first(two: bool):
    def step(cache):
      if two:
        pair = jnp.stack([s["before"], s["pending"]], axis=1)
        logits, cache = model.decode_tokens(params, draft_plan, cache, pair, position - 1)
      else:
        ids = s["pending"][:, None]
        logits, cache = model.decode_tokens(params, draft_plan, cache, ids, position)
      return argmax(logits[:, -1]), cache

    return step

  token, cache = jax.lax.cond(jnp.any(s["refeed"]), first(True), first(False), cache)

  def step(carry, offset):
    cache, token = carry
    logits, cache = model.decode_tokens(
      params, draft_plan, cache, token[:, None], position + offset
    )
    token = argmax(logits[:, 0])
    return (cache, token), token

  (cache, _), rest_KB = jax.lax.scan(step, (cache, token), jnp.arange(1, k))
  return jnp.concatenate([token[:, None], rest_KB.T], axis=1), cache
