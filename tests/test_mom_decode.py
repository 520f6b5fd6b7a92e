"""Mixture-of-Modules banks through ``modjax.evaluate``: perplexity of a MoM run is the mean
cross-entropy of its forward without capacity drops, with its router statistics."""

import dataclasses

import jax
import numpy as np
import pytest
from test_mom import CONFIG, _mom_config
from train_helpers import TRACEBACK, run_module

from modjax import evaluate
from modjax.methods.mom.model import MoMGPT2
from modjax.methods.mom.run import load_mom_bank, train_mom
from modjax.train import experiment

# ---- perplexity of a MoM bank ----------------------------------------------------------------


def _settings(workdir, **values):
  small = dict(
    workdir=str(workdir), train__batch_size=8, data__targets_length=16, data__vocab_size=200,
    mom__router_dim=16, eval__max_examples=8, eval__batch_size=3,
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


def test_mom_bank_refuses_decoded_metrics_and_plans(run):
  base = ["--config", f"{CONFIG}:tiny", f"--config.workdir={run}"]
  cases = [
    (["--config.eval.metrics=rouge"], "rouge/bleu decode an encoder-decoder"),
    (["--plan", "default"], "runs its routed structure, not a plan"),
  ]
  for flags, message in cases:
    result = run_module("modjax.evaluate", base + flags, timeout=300, device_count=1)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert TRACEBACK not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
