"""The MoM training loss under the step contract (``modjax.train.step``), and the sums
``modjax.train.scoring`` adds up to score a MoM bank (teacher-forced perplexity)."""

from __future__ import annotations

import jax.numpy as jnp

from modjax.models.bank import merge_params
from modjax.train.losses import cross_entropy


def mom_loss(model, *, label_smoothing: float = 0.0, z_loss: float = 0.0):
  """``loss_fn(params, frozen, batch, rng, step) -> (loss_sum, weight, aux)`` on decoder-only
  batches: next-token cross-entropy plus ``balance_weight`` x the balancing loss per token (the
  loss is a sum over tokens, so the balancing term is scaled by the token count to weigh the
  same in the per-token mean the step reports). ``aux``: ``ce``, ``balance_loss`` and the
  router statistics (:mod:`.stats`)."""

  def loss_fn(params, frozen, batch, rng, step=None):
    del step
    full = merge_params(params, frozen) if frozen else params
    weights = batch["decoder_loss_weights"]
    logits, aux = model.apply_batch(
      full, None, batch, token_mask=weights > 0, deterministic=rng is None, dropout_rng=rng
    )
    ce_sum, weight = cross_entropy(
      logits,
      batch["decoder_target_tokens"],
      weights,
      label_smoothing=label_smoothing,
      z_loss=z_loss,
    )
    loss_sum = ce_sum + model.mom.balance_weight * aux["balance_loss"] * weight
    return loss_sum, weight, {"ce": ce_sum / jnp.maximum(weight, 1.0), **aux}

  return loss_fn


def score_batch(model, params, batch):
  """(logits, router statistics) of one decoder-only batch for scoring: the forward without
  dropout and without capacity drops (``model.exact()``), so a token's score depends on its
  prefix alone, not on which examples share its batch. The statistics are :mod:`.stats`' means
  over the batch's target tokens (``router/dropped`` and the balancing loss, which are about
  training, are left out)."""
  logits, aux = model.exact().apply_batch(
    params, None, batch, token_mask=batch["decoder_loss_weights"] > 0
  )
  return logits, {k: v for k, v in aux.items() if k.startswith("router/") and k != "router/dropped"}
