"""Loss functions. Each returns sums, so microbatches and devices add up exactly; each follows
the step contract of ``modjax.train.step`` (``loss_fn(params, frozen, batch, rng, step)``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
  logits_BLV, targets_BL, weights_BL, *, label_smoothing: float = 0.0, z_loss: float = 0.0
):
  """(sum of weighted token losses, sum of weights). ``z_loss`` adds z * log(Z)^2 (T5X's)."""
  logits = logits_BLV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  target_lp = jnp.take_along_axis(log_probs, targets_BL[..., None], axis=-1)[..., 0]
  loss = -target_lp
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss - label_smoothing * jnp.mean(log_probs, axis=-1)
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  weights = weights_BL.astype(jnp.float32)
  return jnp.sum(loss * weights), jnp.sum(weights)


def seq2seq_loss(model, plan, *, label_smoothing=0.0, z_loss=0.0):
  """Task loss of an encoder-decoder on seqio ``EncDecFeatureConverter`` batches."""

  def loss_fn(params, frozen, batch, rng, step=None):
    del frozen, step
    logits, _ = model(
      params,
      plan,
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      encoder_segment_ids=batch.get("encoder_segment_ids"),
      decoder_segment_ids=batch.get("decoder_segment_ids"),
      deterministic=rng is None,
      dropout_rng=rng,
    )
    return cross_entropy(
      logits,
      batch["decoder_target_tokens"],
      batch["decoder_loss_weights"],
      label_smoothing=label_smoothing,
      z_loss=z_loss,
    )

  return loss_fn


def lm_loss(model, plan, *, label_smoothing=0.0, z_loss=0.0):
  """Next-token loss of a decoder-only model on ``DecoderFeatureConverter`` batches."""

  def loss_fn(params, frozen, batch, rng, step=None):
    del frozen, step
    logits, _ = model(
      params,
      plan,
      batch["decoder_input_tokens"],
      positions=batch.get("decoder_positions"),
      segment_ids=batch.get("decoder_segment_ids"),
      deterministic=rng is None,
      dropout_rng=rng,
    )
    return cross_entropy(
      logits,
      batch["decoder_target_tokens"],
      batch["decoder_loss_weights"],
      label_smoothing=label_smoothing,
      z_loss=z_loss,
    )

  return loss_fn
