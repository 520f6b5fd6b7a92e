"""Mixture-of-Modules gates and what reaches the router: with K=1 the renormalised (paper) gate
passes no gradient of the task loss to the router (exactly zero), the straight-through gate has
the renormalised gate's forward values and the gradient of log p, and every gate trains the
router from the task loss at K=2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.core.model_config import GPT2Config
from modjax.methods.mom.loss import mom_loss
from modjax.methods.mom.model import MoMGPT2
from modjax.methods.mom.routers import top_k_gates
from modjax.methods.mom.structure import GATES, MoMConfig

SMALL = dict(bottom_layers=1, num_blocks=1, num_attn=3, num_ffn=2, rounds=2, router_dim=16)


def _model(**mom) -> tuple[MoMGPT2, dict]:
  cfg = MoMConfig(**{**SMALL, **mom})
  config = GPT2Config(
    vocab_size=64, n_positions=32, n_embd=32, n_layer=cfg.vanilla_depth, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
  )  # fmt: skip
  model = MoMGPT2(config, cfg)
  return model, model.init(jax.random.key(0))


def _batch(seed=0):
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 12)), jnp.int32)
  return {
    "decoder_input_tokens": ids,
    "decoder_target_tokens": jnp.roll(ids, -1, axis=1),
    "decoder_loss_weights": jnp.ones(ids.shape, jnp.float32),
  }


def _router_grads(model, params) -> list:
  """|gradient| maxima of the routers' parameters under the training loss (mom_loss)."""
  batch = _batch()
  grads = jax.grad(lambda p: mom_loss(model)(p, {}, batch, None)[0])(params)
  return [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["decoder"]["routers"])]


@pytest.mark.parametrize("dispatch", ["capacity", "dense"])
def test_k1_renormalized_gate_passes_no_task_gradient_to_the_router(dispatch):
  model, params = _model(top_k=1, gate="renormalized", dispatch=dispatch, balance_weight=0.0)
  grads = _router_grads(model, params)
  assert len(grads) == 12 and grads == [0.0] * 12  # every kernel and bias of both GRU routers
  balanced, _ = _model(top_k=1, gate="renormalized", dispatch=dispatch, balance_weight=0.01)
  assert max(_router_grads(balanced, params)) > 0  # only the balancing loss moves it


@pytest.mark.parametrize("gate", ["straight_through", "softmax"])
def test_k1_straight_through_and_softmax_gates_pass_the_task_gradient(gate):
  model, params = _model(top_k=1, gate=gate, balance_weight=0.0)
  grads = _router_grads(model, params)
  assert all(np.isfinite(grads)) and min(grads) > 0, grads


@pytest.mark.parametrize("top_k", [1, 2])
def test_straight_through_forward_is_exactly_the_renormalized_gate(top_k):
  paper, params = _model(top_k=top_k, gate="renormalized")
  ours, _ = _model(top_k=top_k, gate="straight_through")
  ids = _batch()["decoder_input_tokens"]
  (logits, aux), (ref, ref_aux) = ours(params, ids), paper(params, ids)
  np.testing.assert_array_equal(logits, ref)
  np.testing.assert_array_equal(aux["balance_loss"], ref_aux["balance_loss"])


def test_straight_through_gradient_is_that_of_g_log_p():
  """K=1: the gradient of c * weight is c * d log p_kept; K=2: c . d(p_kept / sg(sum p_kept))."""
  rng = np.random.default_rng(3)
  scores = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
  coef = jnp.asarray(rng.normal(size=(2, 5, 2)), jnp.float32)
  mask = jnp.ones((2, 5))
  for k in (1, 2):
    cfg = MoMConfig(num_attn=3, num_ffn=3, top_k=k, gate="straight_through", temperature=0.5)
    index = top_k_gates(scores, mask, cfg).index_BLK

    def weighted(s, cfg=cfg, k=k):
      return jnp.sum(coef[..., :k] * top_k_gates(s, mask, cfg).weight_BLK)

    def by_hand(s, k=k, index=index):
      p = jnp.take_along_axis(jax.nn.softmax(s / 0.5, axis=-1), index, axis=-1)
      if k == 1:
        return jnp.sum(coef[..., :1] * jnp.log(p))
      return jnp.sum(coef[..., :k] * p / jax.lax.stop_gradient(jnp.sum(p, -1, keepdims=True)))

    np.testing.assert_allclose(jax.grad(weighted)(scores), jax.grad(by_hand)(scores), atol=1e-5)


@pytest.mark.parametrize("gate", GATES)
def test_k2_every_gate_trains_the_router_from_the_task_loss(gate):
  model, params = _model(top_k=2, gate=gate, balance_weight=0.0)
  grads = _router_grads(model, params)
  assert all(np.isfinite(grads)) and min(grads) > 0, (gate, grads)
  loss_sum, weight, aux = mom_loss(model)(params, {}, _batch(), None)
  assert np.isfinite(float(loss_sum / weight)) and np.isfinite(float(aux["balance_loss"]))
