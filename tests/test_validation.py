"""Validation loss during training and the plateau stop (``modjax.train.validation``): the rule
on hand-made histories, then the micro T5 scored every few steps, stopped at the plateau, not
retrained when restarted, the history cut back to the checkpoint a resumed run starts from, and
the best-scoring parameters kept in ``<workdir>/best`` as a bank of their own."""

import json
import math
import os

import jax
import numpy as np
import pytest
from etils import epath
from train_helpers import jsonl_losses, micro_config

from modjax.store import bank_io
from modjax.train import experiment, scoring
from modjax.train.experiment import ConfigError
from modjax.train.loop import train
from modjax.train.validation import PlateauRule, read_history


def _history(*points):
  return [{"step": s, "cross_entropy": ce} for s, ce in points]


def test_rule_needs_a_point_a_window_back():
  rule = PlateauRule(window=100, min_improvement=0.01)
  assert not rule.reached(_history((50, 3.0), (100, 3.0)))  # nothing 100 steps back yet
  assert rule.reached(_history((50, 3.0), (100, 3.0), (150, 3.0)))


def test_rule_compares_best_losses_over_the_window():
  rule = PlateauRule(window=100, min_improvement=0.01)
  improving = _history((100, 3.0), (200, 2.9))  # 3.3% better than 100 steps ago
  assert not rule.reached(improving)
  assert rule.reached(improving + _history((300, 2.88)))  # 0.7% better than the best at 200
  # A noisy last point does not hide an improvement made inside the window.
  assert not rule.reached(_history((100, 3.0), (150, 2.8), (200, 3.1)))
  assert not PlateauRule(window=0, min_improvement=0.01).reached(_history((1, 1.0), (2, 1.0)))


def _validation(workdir):
  return read_history(epath.Path(workdir) / "metrics" / "validation.jsonl")


def test_training_stops_at_the_plateau_and_a_restart_trains_no_further(tmp_path):
  # An improvement of 99% per window is never reached: the run stops at the first point that
  # has a point one window back (step 8), long before num_steps.
  cfg = micro_config(
    tmp_path,
    mesh__num_devices=1,
    train__num_steps=40,
    train__eval_every=4,
    train__plateau_window=4,
    train__plateau_min_improvement=0.99,
    checkpoint__every_steps=100,
  )
  result = train(cfg)
  assert result.last_step == 8
  history = _validation(tmp_path)
  assert [h["step"] for h in history] == [4, 8]
  assert [h["plateau"] for h in history] == [False, True]
  assert all(math.isfinite(h["cross_entropy"]) and h["tokens"] > 0 for h in history)
  assert sorted(jsonl_losses(tmp_path)) == list(range(1, 9))
  assert os.path.exists(tmp_path / "checkpoints" / "8")  # saved where it stopped

  again = train(cfg)
  assert again.last_step == 8 and again.losses == {}
  assert len(_validation(tmp_path)) == 2


def test_validation_points_are_the_evaluate_numbers(tmp_path):
  cfg = micro_config(tmp_path, mesh__num_devices=1, train__num_steps=6, train__eval_every=6)
  result = train(cfg)
  (point,) = _validation(tmp_path)
  model = result.model
  task = experiment.build_task(cfg, experiment.build_vocabulary(cfg))
  batches = scoring.make_eval_batches(
    task,
    cfg.data.eval_split,
    feature_lengths=experiment.feature_lengths(cfg, model),
    batch_size=cfg.eval.batch_size,
    model_type="encdec",
  )
  plan = bank_io.load_bank(tmp_path).plans[bank_io.DEFAULT_PLAN]
  scores = scoring.teacher_forced_metrics(model, result.state.params, plan, batches)
  assert point["cross_entropy"] == pytest.approx(scores["cross_entropy"], rel=1e-5)
  assert point["tokens"] == scores["tokens"]


def test_a_resumed_run_drops_points_after_its_checkpoint(tmp_path):
  cfg = micro_config(
    tmp_path, mesh__num_devices=1, train__num_steps=6, train__eval_every=2,
    checkpoint__every_steps=4,
  )  # fmt: skip
  train(cfg)
  path = tmp_path / "metrics" / "validation.jsonl"
  # Pretend the run died after its step-6 point but before the step-6 checkpoint.
  (tmp_path / "checkpoints" / "6").rename(tmp_path / "checkpoints" / "gone")
  with open(path, "a") as f:
    f.write(json.dumps({"step": 6, "cross_entropy": 123.0, "perplexity": 1.0}) + "\n")
  cfg.unlock()
  cfg.train.num_steps = 8
  train(cfg)
  history = _validation(tmp_path)
  assert [h["step"] for h in history] == [2, 4, 6, 8]
  assert history[2]["cross_entropy"] != 123.0


def test_the_best_step_survives_as_a_bank_of_its_own(tmp_path):
  cfg = micro_config(
    tmp_path, mesh__num_devices=1, train__num_steps=4, train__eval_every=2,
    checkpoint__every_steps=2, checkpoint__keep=1,
  )  # fmt: skip
  train(cfg)
  best_at_4 = bank_io.load_bank(tmp_path)  # the run's own step-4 checkpoint
  # Four more steps at a learning rate that wrecks the model: step 4 stays the best while
  # checkpoint rotation (keep=1) removes it from checkpoints/.
  cfg.unlock()
  cfg.train.num_steps, cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps = 8, 30.0, 0
  train(cfg)
  history = _validation(tmp_path)
  assert [h["step"] for h in history] == [2, 4, 6, 8]
  assert min(history, key=lambda h: h["cross_entropy"])["step"] == 4
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["8"]
  best = bank_io.load_bank(tmp_path / "best")
  assert best.step == 4 and best.model.config == best_at_4.model.config
  assert best.plans.keys() == best_at_4.plans.keys()
  jax.tree.map(np.testing.assert_array_equal, best.params, best_at_4.params)


@pytest.mark.parametrize(
  ("overrides", "key"),
  [
    (dict(train__eval_every=-1), "train.eval_every"),
    (dict(train__plateau_window=10), "train.plateau_window"),  # no eval_every
    (dict(train__eval_every=10, train__plateau_window=5), "train.plateau_window"),
    (dict(train__plateau_min_improvement=0.0), "train.plateau_min_improvement"),
  ],
)
def test_bad_plateau_settings_are_one_line_errors(tmp_path, overrides, key):
  cfg = micro_config(tmp_path / "run", **overrides)
  with pytest.raises(ConfigError, match=key):
    train(cfg)
  assert not (tmp_path / "run").exists()
