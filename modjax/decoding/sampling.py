"""Temperature, top-k and nucleus (top-p) sampling of the next token, as Hugging Face's
``generate(do_sample=True)`` warps logits: divide by the temperature, keep the ``top_k`` largest,
then keep the smallest set of most probable tokens whose probabilities reach ``top_p`` (the most
probable token always stays), and draw from the softmax of what is left.

``modjax.decoding.generate(..., sampling=Sampling(...), rng=key)`` uses it in place of the argmax;
every row draws with its own stream of ``jax.random.fold_in(rng, step)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to draw each token (hashable: a static argument of the jitted decoding loop)."""

  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0  # 1.0: no nucleus filter

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(
        f"sampling temperature must be > 0, got {self.temperature}; greedy decoding is sampling=None"
      )
    if int(self.top_k) != self.top_k or self.top_k < 0:
      raise ValueError(f"sampling top_k must be an integer >= 0 (0: off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"sampling top_p must be in (0, 1] (1: off), got {self.top_p}")


def warped_logits(logits_BV, sampling: Sampling):
  """float32 logits with the filtered-out tokens at -inf, scaled by 1 / temperature."""
  x = logits_BV.astype(jnp.float32) / sampling.temperature
  if 0 < sampling.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if sampling.top_p < 1:
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
    keep_sorted = before < sampling.top_p  # the first token has 0 above it: always kept
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
    x = jnp.where(keep, x, -jnp.inf)
  return x


def sample(logits_BV, key, sampling: Sampling):
  """[B] int32 tokens drawn from the warped distribution, one independent draw per row."""
  return jax.random.categorical(key, warped_logits(logits_BV, sampling), axis=-1).astype(jnp.int32)
