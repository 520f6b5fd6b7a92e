"""Dropout whose masks are exactly ``jax.random.bernoulli``'s, generated in one fused pass.

``jax.random.bernoulli`` hashes a counter per element with Threefry-2x32. On CPU, JAX lowers
that hash as a rolled loop (five ``while`` iterations over whole arrays: the loop keeps compile
time down), so XLA cannot fuse it: every dropout site writes and re-reads two uint32 arrays per
round, and the backward pass reads the stored bits again. In a t5-small train step (dropout on
attention probabilities, FFN activations and every residual branch: ~80M elements per step)
that was a third of the forward pass.

:func:`keep_mask` computes the same hash with the rounds written out, as plain elementwise
integer ops that XLA fuses with the consumer (and recomputes in the backward pass instead of
storing bits), and compares the raw bits with an integer threshold rather than building floats:
the mask is bit-identical to ``jax.random.bernoulli(key, keep_prob, shape)`` for the same key
(tests/test_dropout.py checks it), so dropout stays deterministic in the key, a resumed run
draws the same masks, and nothing about the keep probability changes. Keys of another PRNG
implementation, 64-bit mode and arrays of 2**32 elements or more fall back to
``jax.random.bernoulli``, and so does every platform where ``modjax.core.cpu_kernels`` turns the
rewrites off (TPU and GPU by default, which generate random bits their own way): the masks are the
same either way.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from modjax.core.cpu_kernels import use_cpu_kernels

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x, bits: int):
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 (20 rounds) as JAX defines it, unrolled: (x1, x2) hashed under (k1, k2)."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, r)
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _threefry_key_words(key):
  """The two uint32 words of a Threefry key, or None for keys this module cannot reproduce."""
  if jax.config.jax_enable_x64 or not jax.config.jax_threefry_partitionable:
    return None
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != "threefry2x32":
      return None
    key = jax.random.key_data(key)
  elif key.dtype != jnp.uint32 or key.shape != (2,):
    return None
  elif jax.config.jax_default_prng_impl != "threefry2x32":
    return None
  return key[0], key[1]


def random_bits(key, shape: tuple[int, ...]):
  """``jax.random.bits(key, shape)`` (uint32) for a Threefry key, as one fusible expression."""
  words = _threefry_key_words(key)
  if words is None or math.prod(shape) >= 2**32:
    return jax.random.bits(key, shape, jnp.uint32)
  if not shape:
    index = jnp.zeros((), jnp.uint32)
  else:  # the flat element index from per-axis iotas, which XLA's SPMD partitioner can split
    strides = np.cumprod((*shape[1:], 1)[::-1])[::-1]
    index = sum(
      lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
      for axis, stride in enumerate(strides)
    )
  hi, lo = threefry2x32(words[0], words[1], jnp.zeros(shape, jnp.uint32), index)
  return hi ^ lo


def keep_mask(key, keep_prob: float, shape: tuple[int, ...]):
  """Boolean mask, True with probability ``keep_prob``: ``jax.random.bernoulli``'s exactly.

  bernoulli draws ``u = (bits >> 9) * 2**-23`` (a float32 in [0, 1)) and keeps ``u < p``
  with p rounded to float32; that is ``bits < ceil(p * 2**23) << 9`` in integers. Where
  ``modjax.core.cpu_kernels`` turns the rewrites off, it is ``jax.random.bernoulli`` itself.
  """
  if not use_cpu_kernels() or _threefry_key_words(key) is None or math.prod(shape) >= 2**32:
    return jax.random.bernoulli(key, keep_prob, shape)
  threshold = math.ceil(float(np.float32(keep_prob)) * 2**23)
  if threshold >= 2**23:
    return jnp.ones(shape, bool)
  return random_bits(key, shape) < np.uint32(threshold << 9)


def dropout(x, rate: float, key):
  """Zeroes each element with probability ``rate`` and scales the rest by ``1 / (1 - rate)``."""
  if rate == 0.0:
    return x
  if rate == 1.0:
    return jnp.zeros_like(x)
  keep_prob = 1.0 - rate
  return lax.select(keep_mask(key, keep_prob, x.shape), x / keep_prob, jnp.zeros_like(x))


class Dropout(nn.Module):
  """``flax.linen.Dropout`` (same ``make_rng("dropout")`` key, same masks) over :func:`dropout`."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))
