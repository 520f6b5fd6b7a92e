"""Sampled decoding (``modjax.decoding.generate(sampling=...)``): draws follow the warped
distribution (chi-square against the model's own probabilities), top-k and top-p keep exactly
their sets, a tiny temperature or top_k=1 gives greedy decoding, and MoM models sample through
the same loop.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from modjax.core.model_config import GPT2Config  # noqa: E402
from modjax.decoding import Sampling, generate, warped_logits  # noqa: E402
from modjax.methods.mom.model import MoMGPT2  # noqa: E402
from modjax.methods.mom.structure import MoMConfig  # noqa: E402
from modjax.models import GPT2  # noqa: E402

VOCAB = 24
CONFIG = GPT2Config(
  vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, eos_token_id=1,
  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)  # fmt: skip
PROMPT = np.array([[5, 9, 3, 7, 2]], np.int32)


@pytest.fixture(scope="module")
def gpt2():
  model = GPT2(CONFIG)
  params = jax.tree.map(lambda x: 2.0 * x, model.init(jax.random.key(0)))  # a peakier distribution
  logits = model(params, model.identity_plan(), jnp.asarray(PROMPT))[0][0, -1]
  return model, params, np.asarray(jax.nn.softmax(logits.astype(jnp.float32)), np.float64)


def _first_tokens(model, params, sampling, rows=4000, seed=0):
  ids = jnp.asarray(np.repeat(PROMPT, rows, axis=0))
  out = generate(
    model, params, model.identity_plan(), ids, max_new_tokens=2, eos_id=-1,
    sampling=sampling, rng=jax.random.key(seed),
  )  # fmt: skip
  return np.asarray(out.tokens[:, 0])


def _assert_follows(tokens, probs):
  """A chi-square goodness-of-fit test of ``tokens`` against ``probs`` (rare tokens pooled)."""
  counts = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
  expected = probs * len(tokens)
  common = expected >= 5
  observed = np.append(counts[common], counts[~common].sum())
  wanted = np.append(expected[common], expected[~common].sum())
  keep = wanted > 0
  p_value = stats.chisquare(observed[keep], wanted[keep]).pvalue
  assert p_value > 1e-3, f"draws do not follow the distribution (p={p_value:.2e})"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draws_follow_the_tempered_distribution(gpt2, temperature):
  model, params, probs = gpt2
  tempered = probs ** (1 / temperature)
  tempered /= tempered.sum()
  tokens = _first_tokens(model, params, Sampling(temperature=temperature))
  _assert_follows(tokens, tempered)
  assert len(set(tokens.tolist())) > 5  # a real spread, not an argmax


def test_top_k_and_top_p_keep_exactly_their_sets(gpt2):
  model, params, probs = gpt2
  order = np.argsort(-probs)
  top3 = _first_tokens(model, params, Sampling(top_k=3))
  assert set(top3.tolist()) == set(order[:3].tolist())
  renormalised = np.where(np.isin(np.arange(VOCAB), order[:3]), probs, 0.0)
  _assert_follows(top3, renormalised / renormalised.sum())
  cumulative = np.cumsum(probs[order])
  nucleus = order[: int(np.searchsorted(cumulative, 0.6)) + 1]  # smallest set reaching 0.6
  drawn = _first_tokens(model, params, Sampling(top_p=0.6))
  assert set(drawn.tolist()) == set(nucleus.tolist())


def test_warped_logits_match_a_numpy_reference():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
  s = Sampling(temperature=0.8, top_k=10, top_p=0.7)
  got = np.asarray(warped_logits(jnp.asarray(logits), s))
  for row, x in zip(got, logits / 0.8, strict=True):
    keep = x >= np.sort(x)[-10]
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    order = np.argsort(-p)
    above = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros_like(keep)
    nucleus[order[above < 0.7]] = True
    np.testing.assert_array_equal(np.isfinite(row), nucleus)
    np.testing.assert_allclose(row[nucleus], x[nucleus], rtol=1e-6)


def test_tiny_temperature_and_top_k_1_decode_greedily_and_seeds_repeat(gpt2):
  model, params, _ = gpt2
  ids = jnp.asarray(np.random.default_rng(1).integers(2, VOCAB, (3, 6)), jnp.int32)
  plan = model.identity_plan()
  greedy = generate(model, params, plan, ids, max_new_tokens=8, eos_id=-1)
  for sampling in (Sampling(temperature=1e-4), Sampling(top_k=1)):
    out = generate(
      model, params, plan, ids, max_new_tokens=8, eos_id=-1, sampling=sampling,
      rng=jax.random.key(5),
    )  # fmt: skip
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.scores, greedy.scores, rtol=1e-5)
  a, b, c = (
    generate(model, params, plan, ids, max_new_tokens=8, eos_id=-1, sampling=Sampling(),
             rng=jax.random.key(seed))
    for seed in (7, 7, 8)
  )  # fmt: skip
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_mom_model_samples_through_the_same_loop():
  cfg = MoMConfig(num_attn=2, num_ffn=2, rounds=2, router="linear", dispatch="dense")
  model = MoMGPT2(
    GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=cfg.vanilla_depth, n_head=4),
    cfg,
  )
  params = model.init(jax.random.key(2))
  ids = jnp.asarray(np.random.default_rng(2).integers(2, VOCAB, (2, 5)), jnp.int32)
  plan = model.identity_plan()
  greedy = generate(model, params, plan, ids, max_new_tokens=6, eos_id=-1)
  top1 = generate(
    model, params, plan, ids, max_new_tokens=6, eos_id=-1, sampling=Sampling(top_k=1),
    rng=jax.random.key(0),
  )  # fmt: skip
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  drawn = generate(
    model, params, plan, ids, max_new_tokens=6, eos_id=-1, sampling=Sampling(temperature=2.0),
    rng=jax.random.key(0),
  )  # fmt: skip
  assert drawn.tokens.shape == (2, 6)


def test_bad_sampling_settings_are_clear_errors(gpt2):
  model, params, _ = gpt2
  for kwargs, message in [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
  ]:
    with pytest.raises(ValueError, match=message):
      Sampling(**kwargs)
  ids, plan = jnp.asarray(PROMPT), model.identity_plan()
  with pytest.raises(ValueError, match="needs rng"):
    generate(model, params, plan, ids, max_new_tokens=2, sampling=Sampling())
  with pytest.raises(ValueError, match="num_beams=1"):
    generate(model, params, plan, ids, max_new_tokens=2, num_beams=2, sampling=Sampling(),
             rng=jax.random.key(0))  # fmt: skip
