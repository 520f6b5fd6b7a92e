"""Mixture-of-Modules banks through ``modjax.evaluate`` and ``modjax.decoding``: perplexity of a MoM
run is the mean cross-entropy of its forward without capacity drops, with its router statistics;
cached decoding (a cache entry per MoM round) equals the full forward step by step, greedy
decoding is its argmax, and beam search of a one-module MoM is GPT-2's."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mom import CONFIG, DEEP, ONE_MODULE, _gpt2_config, _ids, _model, _mom_config
from train_helpers import TRACEBACK, run_cli_batch

from modjax import evaluate
from modjax.core import sharding
from modjax.core.plan import PlanError
from modjax.decoding import generate
from modjax.methods.mom import decoding
from modjax.methods.mom.model import MoMGPT2
from modjax.methods.mom.pools import mom_bank
from modjax.methods.mom.run import load_mom_bank, train_mom
from modjax.methods.mom.structure import MoMConfig
from modjax.models import GPT2, bank
from modjax.train import experiment

# ---- perplexity of a MoM bank ----------------------------------------------------------------


def _settings(workdir, **values):
  small = dict(
    workdir=str(workdir), train__batch_size=8, data__targets_length=16, data__vocab_size=200,
    mom__router_dim=16, eval__max_examples=8, eval__batch_size=3, mesh__num_devices=1,
  )  # fmt: skip
  return _mom_config(**{**small, **values})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step MoM run of configs/mom_gpt2.py:tiny whose capacity buffers (factor 0.5) drop."""
  workdir = tmp_path_factory.mktemp("mom_eval") / "run"
  cfg = _settings(workdir, train__num_steps=2, checkpoint__every_steps=2, mom__capacity_factor=0.5)
  assert train_mom(cfg).last_step == 2
  return workdir


def _eval_batches(cfg, workdir, model, batch_size):
  vocabulary = evaluate.load_eval_vocabulary(cfg, workdir)
  return evaluate.make_eval_batches(
    experiment.build_task(cfg, vocabulary),
    cfg.data.eval_split,
    feature_lengths=experiment.feature_lengths(cfg, model),
    batch_size=batch_size,
    max_examples=cfg.eval.max_examples,
    model_type="lm",
  )


def _mean_cross_entropy(logits, batch) -> float:
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  target = np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  weights = batch["decoder_loss_weights"]
  return float(-(target * weights).sum() / weights.sum())


def test_evaluate_scores_a_mom_run_with_its_forward_without_capacity_drops(run):
  cfg = _settings(run)  # eval batches of 3: two full, one padded
  summary = evaluate.evaluate(cfg)
  model, params, _ = load_mom_bank(run)
  assert model.mom.capacity_factor == 0.5 and summary["plan_name"] == "mom"
  (batch,) = _eval_batches(cfg, run, model, batch_size=8)  # every example in one batch
  forward = jax.jit(
    lambda m, p, b: m(p, b["decoder_input_tokens"], token_mask=b["decoder_loss_weights"] > 0),
    static_argnums=0,
  )
  dense = MoMGPT2(model.config, dataclasses.replace(model.mom, dispatch="dense"))
  logits, aux = forward(dense, params, batch)
  expected = _mean_cross_entropy(logits, batch)
  assert summary["cross_entropy"] == pytest.approx(expected, rel=1e-5)
  assert summary["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
  assert summary["tokens"] == batch["decoder_loss_weights"].sum() and summary["examples"] == 8
  stats = [name for name in aux if name.startswith("router/")]
  assert "router/attn0_load1" in stats and "router/ffn0_skip_round1" in stats
  for name in stats:  # token-weighted means over three batches = the one-batch statistics
    assert summary[name] == pytest.approx(float(aux[name]), abs=1e-5), name
  dropping, aux = forward(model, params, batch)  # as trained: the buffers drop slots
  assert float(aux["router/dropped"]) > 0
  assert abs(_mean_cross_entropy(dropping, batch) - expected) > 1e-4


def test_mom_bank_refuses_decoded_metrics_and_plans(run, tmp_path):
  base = ["--config", f"{CONFIG}:tiny", f"--config.workdir={run}"]
  cases = [
    (["--config.eval.metrics=rouge"], "rouge/bleu decode an encoder-decoder"),
    (["--plan", "default"], "runs its method's own structure, not a plan"),
  ]
  runs = [(str(i), "modjax.evaluate", base + flags) for i, (flags, _) in enumerate(cases)]
  results = run_cli_batch(runs, tmp_path, device_count=1, timeout=300)
  for i, (_, message) in enumerate(cases):
    result = results[str(i)]
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert TRACEBACK not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")


# ---- cached decoding -------------------------------------------------------------------------

DECODER = dict(DEEP, top_layers=1)  # bottom, MoM, anchor, MoM, anchor, top; K=2, H=2, SKIP


def _prompts(batch=2, length=6, pad=(0, 2), seed=3):
  """Left-padded prompts: row i starts with ``pad[i]`` padding tokens."""
  ids = np.asarray(_ids(batch, length, seed))
  mask = (np.arange(length)[None] >= np.asarray(pad)[:, None]).astype(np.int32)
  return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _exact_forward(model, params, ids, mask, positions):
  """One jitted forward for every test: equal models and shapes compile once."""
  return model.exact()(params, ids, attention_mask=mask, positions=positions)[0]


def _full(model, params, ids, mask):
  """Logits of the full forward without drops on left-padded rows (GPT-2 decoding's positions)."""
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return np.asarray(_exact_forward(model, params, ids, mask, positions))


def _decode_steps(model, params, prompt, mask, new, prefilled=False):
  """(logits [B, N, V], cache, index): the prefill's next-token logits, then those of feeding
  ``new[:, t]`` one cached step at a time for t < N - 1. ``prefilled``: the cache is the
  prefill's (for N new tokens), before any step."""
  plan = model.identity_plan()
  cache, logits, index = jax.jit(model.start_decoding, static_argnums=(1, 4))(
    params, plan, prompt, mask, new.shape[1]
  )
  start = cache
  step = jax.jit(model.decode_step, static_argnums=1)
  got = [logits]
  for t in range(new.shape[1] - 1):
    logits, cache = step(params, plan, cache, new[:, t], index + t)
    got.append(logits)
  return np.stack(got, 1), start if prefilled else cache, index


@pytest.mark.parametrize("router,weighted_qkv", [("gru", False), ("mlp", True)])
def test_cached_decoding_steps_equal_the_full_forward(router, weighted_qkv):
  model, params = _model(seed=1, **DECODER, router=router, weighted_qkv=weighted_qkv)
  assert model.mom.dispatch == "capacity"  # decoding runs it without drops
  prompt, mask = _prompts()
  new = _ids(2, 5, seed=9)
  ids = jnp.concatenate([prompt, new], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones_like(new)], axis=1)
  full = _full(model, params, ids, full_mask)
  stepped, cache, index = _decode_steps(model, params, prompt, mask, new, prefilled=True)
  np.testing.assert_allclose(stepped, full[:, 5:-1], atol=1e-4, rtol=0)
  plan = model.identity_plan()
  # three tokens per row in one call from the prefilled cache (room for 5): the same logits
  block, _ = jax.jit(model.decode_tokens, static_argnums=1)(params, plan, cache, new[:, :3], index)
  np.testing.assert_allclose(block, full[:, 6:9], atol=1e-4, rtol=0)


def test_one_row_decode_step_gathers_the_chosen_modules_and_equals_the_full_forward():
  """B*K < N: each step runs the K chosen modules' gathered weights, not the pool."""
  model, params = _model(seed=4, **dict(DECODER, num_attn=4, num_ffn=4, top_k=1))
  prompt, mask = _prompts(batch=1, pad=(1,))
  new = _ids(1, 4, seed=8)
  full = _full(
    model,
    params,
    jnp.concatenate([prompt, new], 1),
    jnp.pad(mask, ((0, 0), (0, 4)), constant_values=1),
  )
  stepped, cache, index = _decode_steps(model, params, prompt, mask, new)
  np.testing.assert_allclose(stepped, full[:, 5:-1], atol=1e-4, rtol=0)

  # XLA's count of the step's FLOPs: the dense pool does 3 more modules' matmuls per round
  def step_flops(dispatch):
    routed = MoMGPT2(model.config, dataclasses.replace(model.mom, dispatch=dispatch))
    lowered = jax.jit(decoding.decode_tokens, static_argnums=0).lower(
      routed, params, cache, new[:, :1], index
    )
    return lowered.cost_analysis()["flops"]

  d, rounds = model.config.n_embd, model.mom.num_blocks * model.mom.rounds
  module_flops = 2 * (3 * d * d + d * d + 2 * 4 * d * d)  # q, k, v, out; FFN in and out
  saved = step_flops("dense") - step_flops("exact")
  assert saved >= 0.9 * rounds * 3 * module_flops


def test_gathered_decoding_of_a_pool_sharded_over_four_devices_equals_one_device():
  """The one-row step gathers modules from a pool whose modules live on 4 different devices."""
  model, params = _model(seed=5, **dict(DECODER, num_attn=4, num_ffn=4, top_k=1))
  mesh = sharding.make_mesh(data=1, expert=4, devices=jax.devices()[:4])
  placed = jax.device_put(params, bank.shardings(model, params, mesh))
  assert placed["decoder"]["pools"]["ffn_1"]["ffn"]["wi"]["kernel"].sharding.spec[0] == "expert"
  prompt, mask = _prompts(batch=1, pad=(1,))
  new = _ids(1, 4, seed=8)
  ref, _, _ = _decode_steps(model, params, prompt, mask, new)
  ours, _, _ = _decode_steps(model, placed, prompt, mask, new)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def _log_probs(model, params, prompt, mask, tokens):
  """Per-row sum of the full forward's log-probabilities of ``tokens`` after ``prompt``."""
  ids = jnp.concatenate([prompt, tokens], axis=1)
  full = _full(model, params, ids, jnp.concatenate([mask, jnp.ones_like(tokens)], axis=1))
  n, p = tokens.shape[1], prompt.shape[1]
  logp = jax.nn.log_softmax(jnp.asarray(full[:, p - 1 : p - 1 + n]), axis=-1)
  return np.asarray(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0].sum(1)), full


def test_greedy_generate_is_the_argmax_of_the_full_forward():
  model, params = _model(seed=2, **DECODER)
  prompt, mask = _prompts()
  result = generate(
    model, params, model.identity_plan(), prompt, mask, max_new_tokens=8, eos_id=-1, pad_id=0
  )
  tokens = result.tokens
  assert tokens.shape == (2, 8) and list(result.lengths) == [8, 8]  # no EOS: every step runs
  summed, full = _log_probs(model, params, prompt, mask, tokens)
  np.testing.assert_array_equal(full[:, 5:-1].argmax(-1), tokens)
  np.testing.assert_allclose(result.scores, summed, atol=1e-4, rtol=0)
  with pytest.raises(PlanError, match="routed structure, not a plan"):
    generate(model, params, GPT2(model.config).identity_plan(), prompt, max_new_tokens=2)


def test_beam_search_of_a_one_module_mom_is_gpt2s():
  config = _gpt2_config(3)
  gpt2 = GPT2(config)
  vanilla = gpt2.init(jax.random.key(5))
  cfg = MoMConfig(**{**ONE_MODULE, "bottom_layers": 1, "top_layers": 1})
  mom = MoMGPT2(config, cfg)
  params = mom_bank(vanilla, cfg, 3, jax.random.key(6))
  prompt, mask = _prompts(pad=(0, 3))
  kw = dict(max_new_tokens=6, num_beams=3, eos_id=7, pad_id=0)
  ours = generate(mom, params, mom.identity_plan(), prompt, mask, **kw)
  ref = generate(gpt2, vanilla, gpt2.identity_plan(), prompt, mask, **kw)
  np.testing.assert_array_equal(ours.tokens, ref.tokens)
  np.testing.assert_array_equal(ours.lengths, ref.lengths)
  np.testing.assert_allclose(ours.scores, ref.scores, atol=1e-5, rtol=0)


def test_beam_search_score_is_the_full_forward_log_prob_of_its_result():
  model, params = _model(seed=4, **DECODER)
  prompt, mask = _prompts()
  result = generate(
    model, params, model.identity_plan(), prompt, mask, max_new_tokens=5, num_beams=3,
    eos_id=-1, pad_id=0,
  )  # fmt: skip
  summed, _ = _log_probs(model, params, prompt, mask, result.tokens)
  np.testing.assert_allclose(result.scores, summed / 5, atol=1e-5, rtol=0)  # length penalty 1
