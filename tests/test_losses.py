"""cross_entropy (hand-written gradient) against optax's softmax cross-entropy and its autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from modjax.train.losses import cross_entropy


def _reference(logits, targets, weights, label_smoothing, z_loss):
  labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
  loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
  loss = loss + z_loss * jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
  return jnp.sum(loss * weights), jnp.sum(weights)


@pytest.mark.parametrize(
  "label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 0.5)]
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_and_gradient_match_optax(label_smoothing, z_loss, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  logits = (4 * jax.random.normal(keys[0], (3, 7, 50))).astype(dtype)
  targets = jax.random.randint(keys[1], (3, 7), 0, 50)
  weights = (jax.random.uniform(keys[2], (3, 7)) > 0.3).astype(jnp.float32)
  kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)

  def ours(x):
    return cross_entropy(x, targets, weights, **kw)[0]

  def ref(x):
    return _reference(x, targets, weights, label_smoothing, z_loss)[0]

  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(jax.jit(ours)(logits), ref(logits), rtol=tol)
  assert cross_entropy(logits, targets, weights, **kw)[1] == weights.sum()
  grad, expected = jax.jit(jax.grad(ours))(logits), jax.grad(ref)(logits)
  assert grad.dtype == logits.dtype
  np.testing.assert_allclose(
    np.asarray(grad, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol
  )
  # The step divides the summed loss by the weight: the cotangent is not always 1.
  scaled = jax.grad(lambda x: 0.25 * ours(x))(logits)
  np.testing.assert_allclose(
    np.asarray(scaled, np.float32), 0.25 * np.asarray(grad, np.float32), rtol=1e-6, atol=1e-7
  )
