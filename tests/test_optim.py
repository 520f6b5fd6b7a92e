"""modjax's clipping and Adafactor against optax's: same state pytrees, same updates."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from modjax.core.cpu_kernels import ENV_VAR
from modjax.train import optim


@pytest.fixture(autouse=True)
def _cpu_kernels_on(monkeypatch):
  """These tests are about the rewrites: run them whatever the platform or MODJAX_CPU_KERNELS."""
  monkeypatch.setenv(ENV_VAR, "on")


def _params():
  keys = jax.random.split(jax.random.key(0), 5)
  return {
    "embedding": jax.random.normal(keys[0], (300, 160)),  # factored: both dims >= 128
    "ffn": jax.random.normal(keys[1], (130, 200)) * 0.05,
    "heads": jax.random.normal(keys[2], (160, 4, 16)) * 0.05,  # 3-D, second dim < 128: full v
    "scale": jnp.ones((160,)),
    "tiny": jnp.full((7,), 1e-4),  # rms below 1e-3: the parameter scale's floor
  }


def _reference(cfg, schedule):
  core = {
    "adafactor": lambda: optax.adafactor(
      learning_rate=schedule,
      decay_rate=cfg.adafactor_decay_rate,
      clipping_threshold=cfg.adafactor_clipping or None,
      multiply_by_parameter_scale=cfg.adafactor_parameter_scale,
      weight_decay_rate=cfg.weight_decay or None,
    ),
    "adamw": lambda: optax.adamw(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    ),
  }[cfg.name]()
  return optax.chain(*([optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []), core)


def _config(**overrides):
  from modjax.train.defaults import base_config

  cfg = base_config().optimizer
  cfg.update(overrides)
  return ml_collections.FrozenConfigDict(cfg)


@pytest.mark.parametrize(
  "overrides",
  [
    {},  # the default: Adafactor, parameter scale, clipping at 1.0
    {"grad_clip": 0.0, "weight_decay": 0.01},
    {"adafactor_parameter_scale": False, "schedule": "constant"},
    {"adafactor_clipping": 1.0},  # optax's update clipping (an early update is clipped)
    {"adafactor_clipping": 0.5, "adafactor_parameter_scale": False, "schedule": "constant"},
    {"name": "adamw"},
  ],
)
@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # clipping inactive, active
def test_updates_and_state_match_optax(overrides, grad_scale):
  cfg = _config(**overrides)
  ours, schedule = optim.make_optimizer(cfg, total_steps=50)
  reference = _reference(cfg, schedule)
  params = _params()
  state, ref_state = ours.init(params), reference.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  update, ref_update = jax.jit(ours.update), jax.jit(reference.update)
  p, ref_p = params, params
  for step in range(4):
    keys = jax.random.split(jax.random.key(step + 1), len(params))
    grads = {
      name: grad_scale * jax.random.normal(key, x.shape)
      for key, (name, x) in zip(keys, sorted(params.items()), strict=True)
    }
    u, state = update(grads, state, p)
    ref_u, ref_state = ref_update(grads, ref_state, ref_p)
    for name in params:  # within float rounding (Adam's m / sqrt(v) amplifies it near m = 0)
      atol = 1e-5 * float(jnp.abs(ref_u[name]).max())
      np.testing.assert_allclose(u[name], ref_u[name], rtol=2e-5, atol=atol, err_msg=name)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5 * np.abs(b).max()),
      state,
      ref_state,
    )
    p, ref_p = optax.apply_updates(p, u), optax.apply_updates(ref_p, ref_u)
