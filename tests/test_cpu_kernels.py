"""The MODJAX_CPU_KERNELS switch: the XLA:CPU rewrites and the stock JAX/optax paths give the
same values and gradients, and the switch decides which one a traced function holds.

The setting is read when a function is traced, and ``jax.jit`` caches traces by function, so
every comparison here traces a fresh function (or none) after setting the variable.
"""

import ast
import inspect

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import TINY_T5

from modjax.core import cpu_kernels
from modjax.core.cpu_kernels import ENV_VAR, CpuKernelsError, cpu_kernels_setting, use_cpu_kernels
from modjax.core.model_config import T5Config
from modjax.models import T5
from modjax.nn import contractions
from modjax.nn.dropout import Dropout, dropout
from modjax.nn.layers import Embed, Projection
from modjax.train import optim

PATHS = ("on", "off")


@pytest.fixture
def setting(monkeypatch):
  """``setting("on" | "off" | "auto")`` sets MODJAX_CPU_KERNELS for the rest of the test."""
  return lambda value: monkeypatch.setenv(ENV_VAR, value)


def _both(setting, fn):
  """``{path: fn()}`` with the switch on and off (``fn`` traces its own functions)."""
  out = {}
  for path in PATHS:
    setting(path)
    out[path] = fn()
  return out


def _close(a, b, rtol=1e-6):
  """Equal to ``rtol`` of the larger array's largest magnitude, leaf by leaf."""

  def check(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), 1e-30))

  jax.tree.map(check, a, b)


# ---- the switch --------------------------------------------------------------------------------


def test_setting_defaults_to_the_platform_and_can_be_forced(setting, monkeypatch):
  monkeypatch.delenv(ENV_VAR, raising=False)
  assert cpu_kernels_setting() == "auto"
  assert use_cpu_kernels() == (jax.default_backend() == "cpu")
  for value, expected in (
    ("on", True),
    ("OFF", False),
    (" off ", False),
    ("", jax.default_backend() == "cpu"),
  ):
    setting(value)
    assert use_cpu_kernels() is expected, value


def test_an_unknown_setting_is_a_one_line_error(setting):
  setting("fast")
  with pytest.raises(CpuKernelsError, match=r"MODJAX_CPU_KERNELS='fast' .* auto, on or off"):
    use_cpu_kernels()
  with pytest.raises(CpuKernelsError):  # raised where the model is traced, not later
    contractions.dense(jnp.ones((2, 3)), jnp.ones((3, 4)), 1)


# ---- contractions ------------------------------------------------------------------------------

DENSE_CASES = [  # (x shape, kernel shape, in_dims): a projection, q/k/v, an output projection
  ((3, 7, 16), (16, 24), 1),
  ((2, 5, 16), (16, 4, 8), 1),
  ((2, 5, 4, 8), (4, 8, 16), 2),
]


@pytest.mark.parametrize("x_shape, kernel_shape, in_dims", DENSE_CASES)
def test_dense_values_and_vjp_agree(setting, x_shape, kernel_shape, in_dims):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, kernel_shape)

  def run():
    y, vjp = jax.vjp(lambda x, k: contractions.dense(x, k, in_dims), x, kernel)
    return y, vjp(jax.random.normal(kg, y.shape))

  out = _both(setting, run)
  _close(out["on"], out["off"])


def test_tied_logits_values_and_vjp_agree(setting):
  kx, ke, kg = jax.random.split(jax.random.key(1), 3)
  x_BLD, embedding_VD = jax.random.normal(kx, (2, 6, 16)), jax.random.normal(ke, (40, 16))

  def run():
    logits, vjp = jax.vjp(contractions.tied_logits, x_BLD, embedding_VD)
    return logits, vjp(jax.random.normal(kg, logits.shape))

  out = _both(setting, run)
  assert out["on"][0].dtype == out["off"][0].dtype == jnp.float32
  _close(out["on"], out["off"])


def _forward_jaxpr(module, init_input, x, method=None) -> str:
  """The jaxpr of ``module.apply`` on ``x``, traced now (a fresh function)."""
  params = jax.eval_shape(module.init, jax.random.key(0), init_input)
  return str(jax.make_jaxpr(lambda p, x: module.apply(p, x, method=method))(params, x))


def test_switch_selects_the_custom_vjp_or_the_plain_contraction(setting):
  x_BLD = jnp.ones((2, 3, 16))
  projection = Projection((16, 24), ("embed", "mlp"), 1, 0.1)
  embed = Embed(40, 16, ("vocab", "embed"), 1.0)
  for path, custom in (("on", True), ("off", False)):
    setting(path)
    for jaxpr in (
      _forward_jaxpr(projection, x_BLD, x_BLD),
      _forward_jaxpr(embed, jnp.zeros((1, 2), jnp.int32), x_BLD, method=Embed.attend),
    ):
      assert ("custom_vjp_call" in jaxpr) is custom, (path, jaxpr)
      assert custom or "dot_general" in jaxpr, jaxpr


# ---- dropout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_masks_values_and_gradients_are_identical(setting, rate):
  x = jax.random.normal(jax.random.key(2), (4, 33, 17))
  key = jax.random.fold_in(jax.random.key(3), 7)

  def run():
    y, vjp = jax.vjp(lambda x: dropout(x, rate, key), x)
    module = Dropout(rate).apply({}, x, False, rngs={"dropout": key})
    return y, vjp(jnp.ones_like(y)), module

  out = _both(setting, run)
  jax.tree.map(np.testing.assert_array_equal, out["on"], out["off"])
  kept = np.asarray(out["off"][0] != 0)
  assert 0 < kept.mean() < 1


def test_switch_selects_the_unrolled_hash_or_jax_random(setting):
  x = jnp.ones((4, 8))
  for path, unrolled in (("on", True), ("off", False)):
    setting(path)
    jaxpr = str(jax.make_jaxpr(lambda x, key: dropout(x, 0.1, key))(x, jax.random.key(0)))
    assert ("random_bits" not in jaxpr) is unrolled, (path, jaxpr)
    assert (" xor " in jaxpr) is unrolled, (path, jaxpr)  # the hash's mixing, inline


# ---- a whole model -----------------------------------------------------------------------------


def test_t5_loss_and_gradients_agree_with_dropout(setting):
  """A T5 with dropout and a tied head: the same loss and gradients on either path, and no
  custom VJP or unrolled hash left in the stock path's trace."""
  model = T5(T5Config(**{**TINY_T5, "num_layers": 1, "num_decoder_layers": 1, "dropout_rate": 0.1}))
  assert model.config.tie_word_embeddings
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  enc, dec, targets = (jnp.asarray(rng.integers(1, 64, (2, n)), jnp.int32) for n in (9, 7, 7))

  def run():
    def loss(params):  # a fresh function per path: jax caches traces by function
      logits, _ = model(
        params, model.identity_plan(), enc, dec, deterministic=False, dropout_rng=jax.random.key(5)
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    jaxpr = str(jax.make_jaxpr(loss)(params))
    return (
      jax.jit(jax.value_and_grad(loss))(params),
      "custom_vjp_call" in jaxpr,
      "random_bits" in jaxpr,
    )

  out = _both(setting, run)
  _close(out["on"][0], out["off"][0], rtol=1e-5)
  assert out["on"][1:] == (True, False) and out["off"][1:] == (False, True)


# ---- the optimizer -----------------------------------------------------------------------------


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {
    "embedding": jax.random.normal(keys[0], (300, 160)),  # factored
    "heads": jax.random.normal(keys[1], (160, 4, 16)) * 0.05,  # 3-D with a short axis: full v
    "scale": jnp.ones((160,)),
    "tiny": jnp.full((7,), 1e-4),  # rms below the parameter scale's floor
  }


def _optimizer_config(**overrides):
  from modjax.train.defaults import base_config

  cfg = base_config().optimizer
  cfg.update(overrides)
  return ml_collections.FrozenConfigDict(cfg)


def _run_steps(cfg, steps=5):
  optimizer, _ = optim.make_optimizer(cfg, total_steps=50)
  params = _params()
  state = optimizer.init(params)
  update = jax.jit(lambda g, s, p: optimizer.update(g, s, p))
  history = []
  for step in range(steps):
    keys = jax.random.split(jax.random.key(step + 1), len(params))
    grads = {
      n: 3.0 * jax.random.normal(k, x.shape) for k, (n, x) in zip(keys, params.items(), strict=True)
    }
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return history, params, state


@pytest.mark.parametrize(
  "overrides",
  [{}, {"grad_clip": 0.0, "weight_decay": 0.01}, {"adafactor_parameter_scale": False}],
)
def test_adafactor_steps_agree(setting, overrides):
  """Several steps (clipping active at the default 1.0) of both optimizers from the same start."""
  cfg = _optimizer_config(**overrides)
  out = _both(setting, lambda: _run_steps(cfg))
  assert jax.tree.structure(out["on"][2]) == jax.tree.structure(out["off"][2])
  _close(out["on"][:2], out["off"][:2], rtol=1e-6)
  _close(out["on"][2], out["off"][2], rtol=1e-5)  # second moments: squares of the gradients


def _update_jaxpr(optimizer) -> str:
  params = _params()
  state = optimizer.init(params)
  return str(jax.make_jaxpr(optimizer.update)(params, state, params))


def test_switch_off_builds_public_optax(setting):
  """Off: the very computation of optax's public clip_by_global_norm and adafactor, with the
  settings modjax's config means (gradient clipping, no update clipping, parameter scale)."""
  cfg = _optimizer_config()
  setting("off")
  ours, schedule = optim.make_optimizer(cfg, total_steps=50)
  public = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adafactor(
      learning_rate=schedule,
      decay_rate=cfg.adafactor_decay_rate,
      clipping_threshold=None,
      multiply_by_parameter_scale=cfg.adafactor_parameter_scale,
    ),
  )
  assert _update_jaxpr(ours) == _update_jaxpr(public)
  setting("on")
  rewritten, _ = optim.make_optimizer(cfg, total_steps=50)
  assert _update_jaxpr(rewritten) != _update_jaxpr(public)


def test_no_private_optax_import():
  """An optax release that moves its private modules cannot break either path at import."""
  for module in (optim, cpu_kernels):
    tree = ast.parse(inspect.getsource(module))
    names = [
      node.module if isinstance(node, ast.ImportFrom) else alias.name
      for node in ast.walk(tree)
      if isinstance(node, ast.Import | ast.ImportFrom)
      for alias in node.names
    ]
    assert not [n for n in names if n and "_src" in n], (module.__name__, names)
