"""modjax.nn.dropout draws exactly ``jax.random.bernoulli``'s masks (and flax's Dropout outputs)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.core.cpu_kernels import ENV_VAR
from modjax.nn.dropout import Dropout, dropout, keep_mask, random_bits


@pytest.fixture(autouse=True)
def _cpu_kernels_on(monkeypatch):
  """These tests are about the rewrites: run them whatever the platform or MODJAX_CPU_KERNELS."""
  monkeypatch.setenv(ENV_VAR, "on")


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 33, 17)])
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.123, 1 - 1e-9])
def test_keep_mask_is_bernoulli(shape, keep):
  for seed in range(3):
    key = jax.random.fold_in(jax.random.key(seed), 11)
    expected = jax.random.bernoulli(key, keep, shape)
    np.testing.assert_array_equal(
      jax.jit(keep_mask, static_argnums=(1, 2))(key, keep, shape), expected
    )


def test_raw_uint32_keys_and_bits_match_jax():
  key = jax.random.PRNGKey(4)  # the legacy raw uint32[2] key
  np.testing.assert_array_equal(keep_mask(key, 0.8, (4, 9)), jax.random.bernoulli(key, 0.8, (4, 9)))
  np.testing.assert_array_equal(random_bits(key, (5, 6)), jax.random.bits(key, (5, 6), jnp.uint32))


def test_other_prng_implementations_fall_back_to_bernoulli():
  key = jax.random.key(1, impl="rbg")
  np.testing.assert_array_equal(keep_mask(key, 0.7, (6, 8)), jax.random.bernoulli(key, 0.7, (6, 8)))


def test_dropout_scales_kept_values_and_keeps_the_right_share():
  x = jnp.arange(1, 2**20 + 1, dtype=jnp.float32).reshape(1024, 1024)
  rate = 0.1
  y = jax.jit(dropout, static_argnums=1)(x, rate, jax.random.key(0))
  kept = np.asarray(y != 0)
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x / (1 - rate))[kept], rtol=1e-7)
  sigma = np.sqrt(rate * (1 - rate) / x.size)
  assert abs(kept.mean() - (1 - rate)) < 5 * sigma
  other = dropout(x, rate, jax.random.fold_in(jax.random.key(0), 1))
  assert (np.asarray(other != 0) != kept).any()  # another key (another step): another mask


def test_module_matches_flax_dropout():
  x = jax.random.normal(jax.random.key(2), (2, 16, 32))
  rngs = {"dropout": jax.random.key(3)}
  ours = Dropout(0.25).apply({}, x, False, rngs=rngs)
  flax = nn.Dropout(0.25).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(ours, flax)
  np.testing.assert_array_equal(Dropout(0.25).apply({}, x, True), x)
