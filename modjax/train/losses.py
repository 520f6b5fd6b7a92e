"""Loss functions. Each returns sums, so microbatches and devices add up exactly; each follows
the step contract of ``modjax.train.step`` (``loss_fn(params, frozen, batch, rng, step)``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def cross_entropy(
  logits_BLV, targets_BL, weights_BL, *, label_smoothing: float = 0.0, z_loss: float = 0.0
):
  """(sum of weighted token losses, sum of weights). ``z_loss`` adds z * log(Z)^2 (T5X's).

  The token losses have a hand-written gradient (:func:`_token_losses`): one fused pass over
  the logits instead of autodiff's log-softmax, scatter of the target gradient into a zeroed
  [B, L, V] array and sum of the pieces.
  """
  loss_BL = _token_losses(logits_BLV, targets_BL, float(label_smoothing), float(z_loss))
  weights = weights_BL.astype(jnp.float32)
  return jnp.sum(loss_BL * weights), jnp.sum(weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_losses(logits_BLV, targets_BL, label_smoothing, z_loss):
  """Per-token -log p(target), with label smoothing against the uniform distribution (T5X's:
  (1 - s) x the target's loss + s x the mean over the vocabulary) and z x log(Z)^2."""
  return _token_losses_fwd(logits_BLV, targets_BL, label_smoothing, z_loss)[0]


def _token_losses_fwd(logits_BLV, targets_BL, label_smoothing, z_loss):
  logits = logits_BLV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  loss = log_z - jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - jnp.mean(logits, axis=-1))
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  return loss, (logits_BLV, targets_BL, log_z)


def _token_losses_bwd(label_smoothing, z_loss, residuals, g_BL):
  """d loss / d logits = p (1 + 2 z log Z) - (1 - s) onehot(target) - s / V, with p = softmax."""
  logits_BLV, targets_BL, log_z = residuals
  probs = jnp.exp(logits_BLV.astype(jnp.float32) - log_z[..., None])
  if z_loss:
    probs = probs * (1.0 + 2.0 * z_loss * log_z)[..., None]
  vocab = logits_BLV.shape[-1]
  is_target = (
    jax.lax.broadcasted_iota(jnp.int32, logits_BLV.shape, logits_BLV.ndim - 1)
    == targets_BL[..., None]
  )
  grad = probs - jnp.where(is_target, 1.0 - label_smoothing, 0.0) - label_smoothing / vocab
  return (grad * g_BL[..., None]).astype(logits_BLV.dtype), None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def task_loss(model, plan, *, label_smoothing=0.0, z_loss=0.0):
  """Step-contract task loss of any architecture on its seqio batches (EncDec for an
  encoder-decoder, Decoder for a decoder-only model): ``model.apply_batch`` + cross-entropy."""

  def loss_fn(params, frozen, batch, rng, step=None):
    del frozen, step
    logits, _ = model.apply_batch(params, plan, batch, deterministic=rng is None, dropout_rng=rng)
    return cross_entropy(
      logits,
      batch["decoder_target_tokens"],
      batch["decoder_loss_weights"],
      label_smoothing=label_smoothing,
      z_loss=z_loss,
    )

  return loss_fn
