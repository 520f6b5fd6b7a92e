"""The training loop end to end on CPU: the micro T5 learns, gives the same losses on 1 device and
on 8 fake devices (data=2 x fsdp=2 x tensor=2) with parameters sharded as the rules say, gradient
accumulation is exact, AdamW / packing / bfloat16 / GPT-2 run, and ``modjax.evaluate`` scores the
trained workdir. Runs in-process (``train(cfg)``) except the evaluation CLI.
"""

import glob
import json
import os
import subprocess

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_helpers import (
  jsonl_losses,
  kill,
  losses_in_order,
  micro_config,
  micro_flags,
  start_module,
)

from modjax.train.loop import train

NUM_STEPS = 30
SHORT_STEPS = 8
EVALUATE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def one_device_run(micro_run):
  cfg, result = micro_run  # conftest: micro config, 30 steps on one device
  assert cfg.train.num_steps == NUM_STEPS and cfg.mesh.num_devices == 1
  return cfg, result


@pytest.fixture(scope="module")
def evaluation(one_device_run, tmp_path_factory):
  """``python -m modjax.evaluate`` on the trained workdir, started when first requested and left
  running in the background while the in-process tests train; yields (process, log path)."""
  cfg, _ = one_device_run
  log_path = tmp_path_factory.mktemp("evaluate") / "evaluate.log"
  flags = micro_flags(cfg.workdir, train__num_steps=NUM_STEPS)
  with open(log_path, "w") as log:
    process = start_module("modjax.evaluate", flags, stdout=log, stderr=log, device_count=1)
  try:
    yield process, log_path
  finally:
    kill(process)


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
  if jax.device_count() < 8:
    pytest.fail(f"needs 8 fake CPU devices (XLA_FLAGS from conftest), found {jax.device_count()}")
  workdir = tmp_path_factory.mktemp("eight_devices")
  cfg = micro_config(
    workdir,
    mesh__num_devices=8,
    mesh__data=2,
    mesh__fsdp=2,
    mesh__tensor=2,
    train__num_steps=NUM_STEPS,
  )
  return cfg, train(cfg)


def test_micro_config_loss_falls(one_device_run, evaluation):
  del evaluation  # started here so that it runs alongside the tests below
  _, result = one_device_run
  losses = losses_in_order(result.losses)
  assert len(losses) == NUM_STEPS and result.last_step == NUM_STEPS
  assert np.all(np.isfinite(losses))
  first, last = losses[:5].mean(), losses[-5:].mean()
  assert last < first - 1.0, f"loss did not fall clearly: first 5 {first:.3f}, last 5 {last:.3f}"


def test_metrics_jsonl_matches_returned_losses(one_device_run):
  cfg, result = one_device_run
  logged = jsonl_losses(cfg.workdir)
  assert sorted(logged) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_array_equal(losses_in_order(logged), losses_in_order(result.losses))


def test_eight_devices_give_the_same_losses_as_one(one_device_run, eight_device_run):
  _, one = one_device_run
  _, eight = eight_device_run
  np.testing.assert_allclose(losses_in_order(eight.losses), losses_in_order(one.losses), rtol=1e-5)


def test_parameters_are_sharded_by_the_rules(eight_device_run):
  _, result = eight_device_run
  params = result.state.params
  mesh = params["token_embedding"]["embedding"].sharding.mesh
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  expected = {
    # (embed, mlp) -> (fsdp, tensor): a quarter of the kernel per device, replicated over data.
    ("encoder", "blocks", "0", "ffn", "wi", "kernel"): (P("fsdp", "tensor"), (32, 64)),
    ("decoder", "blocks", "1", "ffn", "wo", "kernel"): (P("tensor", "fsdp"), (64, 32)),
    ("encoder", "blocks", "0", "self_attn", "query", "kernel"): (
      P("fsdp", "tensor", None),
      (32, 2, 16),
    ),
    ("token_embedding", "embedding"): (P("tensor", "fsdp"), (128, 32)),
    ("decoder", "relpos_bias", "embedding"): (P(None, "tensor"), (8, 2)),
    ("encoder", "final_norm", "scale"): (P("fsdp"), (32,)),
  }
  for path, (spec, shard_shape) in expected.items():
    array = params
    for key in path:
      array = array[key]
    name = "/".join(path)
    assert _normalized(array.sharding.spec) == _normalized(spec), name
    shards = array.addressable_shards
    assert len(shards) == 8
    assert {s.data.shape for s in shards} == {shard_shape}, name
    # Every device holds its slice of the one global value.
    full = np.asarray(array)
    for s in shards:
      np.testing.assert_array_equal(np.asarray(s.data), full[s.index])


def _normalized(spec: P) -> tuple:
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


def test_gradient_accumulation_matches_one_microbatch(one_device_run, tmp_path):
  _, one = one_device_run
  cfg = micro_config(tmp_path, mesh__num_devices=1, train__num_microbatches=2)
  accumulated = train(cfg)
  np.testing.assert_allclose(
    losses_in_order(accumulated.losses), losses_in_order(one.losses), rtol=1e-5
  )


def _short_run(workdir, **overrides):
  cfg = micro_config(workdir, mesh__num_devices=1, train__num_steps=SHORT_STEPS, **overrides)
  result = train(cfg)
  losses = losses_in_order(result.losses)
  assert len(losses) == SHORT_STEPS and np.all(np.isfinite(losses)), losses
  return cfg, result, losses


def test_adamw_trains(tmp_path):
  _, result, losses = _short_run(
    tmp_path, optimizer__name="adamw", optimizer__learning_rate=3e-3, optimizer__weight_decay=0.01
  )
  assert losses[-3:].mean() < losses[:3].mean() - 0.2, losses
  # AdamW keeps first and second moments of every parameter: the optimizer state is not factored.
  leaves = jax.tree.leaves(result.state.opt_state)
  param_count = sum(x.size for x in jax.tree.leaves(result.state.params))
  assert sum(x.size for x in leaves) >= 2 * param_count


def test_packing_trains_on_packed_rows(tmp_path):
  from modjax import data

  cfg, _, losses = _short_run(
    tmp_path, data__pack=True, data__inputs_length=256, data__targets_length=64
  )
  # Unpacked, a row holds one example's targets; packed rows must hold more target tokens than
  # the longest example has (so at least two examples share some row).
  vocabulary = data.load_vocabulary(os.path.join(cfg.workdir, "vocab", "spm.model"), extra_ids=0)
  examples = data.make_eval_examples(data.get_task("embedded_lead", vocabulary), "train")
  longest = max(len(e["targets_ids"]) for e in examples)
  tokens = [r["tokens"] for r in _jsonl_records(cfg.workdir)]
  assert min(tokens) > cfg.train.batch_size * longest, (tokens, longest)
  assert losses[-3:].mean() < losses[:3].mean(), losses


def test_bfloat16_compute_tracks_float32(one_device_run, tmp_path):
  _, fp32 = one_device_run
  _, result, losses = _short_run(tmp_path, model__dtype="bfloat16")
  params = jax.tree.leaves(result.state.params)
  assert all(p.dtype == np.float32 for p in params)  # param_dtype stays float32
  # Same initialisation and data: the first step's loss agrees to bfloat16 precision.
  np.testing.assert_allclose(losses[0], fp32.losses[1], rtol=2e-2)
  assert not np.allclose(losses[0], fp32.losses[1], rtol=1e-7, atol=0)  # bf16 really computed
  assert losses[-3:].mean() < losses[:3].mean(), losses


def test_gpt2_preset_trains_as_a_language_model(tmp_path):
  # Decoder-only on an encoder-decoder task: the loop feeds it the targets as a plain LM.
  _, result, losses = _short_run(tmp_path, model__preset="gpt2-tiny")
  assert "decoder" in result.state.params and "encoder" not in result.state.params
  assert result.model.config.vocab_size == 256  # the preset resized to the 200-piece vocabulary
  assert losses[-3:].mean() < losses[:3].mean(), losses


def _jsonl_records(workdir) -> list[dict]:
  with open(os.path.join(str(workdir), "metrics", "train.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_summaries_and_loss_plot_exist(one_device_run):
  cfg, _ = one_device_run
  png = os.path.join(cfg.workdir, "metrics", "train_loss.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  events = glob.glob(os.path.join(cfg.workdir, "tensorboard", "events.out.tfevents.*"))
  assert events, os.listdir(cfg.workdir)
  from modjax.data.tf_setup import tf

  loss_steps = []
  for path in events:
    for event in tf.compat.v1.train.summary_iterator(path):
      loss_steps += [event.step for v in event.summary.value if v.tag == "train/loss"]
  log_every = cfg.train.log_every
  assert sorted(loss_steps) == list(range(log_every, NUM_STEPS + 1, log_every))


def test_evaluate_cli_writes_predictions_and_rouge(one_device_run, evaluation):
  cfg, _ = one_device_run
  process, log_path = evaluation
  try:
    code = process.wait(timeout=EVALUATE_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    code = None
  assert code == 0, f"exit code {code}:\n{log_path.read_text()[-3000:]}"
  (metrics_file,) = glob.glob(
    os.path.join(cfg.workdir, "eval", f"validation_step{NUM_STEPS}_bank-*.metrics.json")
  )
  stem = metrics_file.removesuffix(".metrics.json")
  with open(stem + ".predictions.jsonl") as f:
    predictions = [json.loads(line) for line in f]
  assert len(predictions) == cfg.eval.max_examples
  for p in predictions:
    assert set(p) == {"inputs", "target", "prediction"} and isinstance(p["prediction"], str)
  with open(stem + ".metrics.json") as f:
    scores = json.load(f)
  assert scores["step"] == NUM_STEPS and scores["examples"] == cfg.eval.max_examples
  # The scores are rouge-score's F-measures (stemmed) of the written predictions, averaged, x100.
  from rouge_score import rouge_scorer

  types = ("rouge1", "rouge2", "rougeL", "rougeLsum")
  scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
  each = [scorer.score(p["target"], p["prediction"]) for p in predictions]
  for key in types:
    expected = 100.0 * np.mean([s[key].fmeasure for s in each])
    assert scores[key] == pytest.approx(expected, rel=1e-9, abs=1e-9), (key, scores)
  assert scores["rouge1"] > 0, "no prediction shares a word with its target: nothing was compared"
