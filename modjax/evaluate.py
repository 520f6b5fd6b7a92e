"""Decode a split with a trained (or imported) model and score it.

  python -m modjax.evaluate --config configs/tiny.py --config.workdir=/tmp/modjax/tiny

Parameters come from the latest good checkpoint in ``workdir/checkpoints`` (or, with none, from
``model.init_from``). Writes ``workdir/eval/<split>_step<N>.predictions.jsonl`` (input, target,
prediction per example) and ``.metrics.json`` (ROUGE-1/2/L/Lsum with newline-split sentences for
Lsum, and/or sacreBLEU on detokenised text).
"""

from __future__ import annotations

import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from modjax import checkpoint, decode, metrics
from modjax.data import make_eval_examples
from modjax.train import experiment, optim
from modjax.train.step import init_state

log = logging.getLogger("modjax.evaluate")


def load_trained_params(cfg, model, hf_params=None):
  """(step, params) from the latest good checkpoint, else the imported HF parameters."""
  optimizer, _ = optim.make_optimizer(cfg.optimizer, cfg.train.num_steps)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = jax.eval_shape(lambda: init_state(model.init(jax.random.key(0)), optimizer))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
  ckpt = checkpoint.Checkpointer(
    str(experiment.workdir(cfg) / "checkpoints"),
    max_to_keep=None,
    save_interval_steps=1,
    async_save=False,
  )
  try:
    restored = ckpt.restore_latest(
      {"step": abstract.step, "params": abstract.params, "opt_state": abstract.opt_state}
    )
  finally:
    ckpt.close()
  if restored is not None:
    step, state, _ = restored
    return step, state["params"]
  if hf_params is not None:
    return 0, jax.tree.map(jnp.asarray, hf_params)
  raise experiment.ConfigError(
    f"no checkpoint in {experiment.workdir(cfg) / 'checkpoints'} and no model.init_from; train first"
  )


def predict(
  model, params, vocabulary, examples, *, batch_size, inputs_length, max_new_tokens, num_beams
):
  """Decoded texts for ``examples`` (dicts with ``inputs_ids``), in order. Inputs are padded to
  ``inputs_length`` and batches to ``batch_size`` so decoding compiles once."""
  plan = model.identity_plan()
  texts = []
  start = time.perf_counter()
  for i in range(0, len(examples), batch_size):
    chunk = examples[i : i + batch_size]
    ids = np.zeros((batch_size, inputs_length), np.int32)
    for row, ex in enumerate(chunk):
      seq = np.asarray(ex["inputs_ids"][:inputs_length])
      ids[row, : len(seq)] = seq
    result = decode.generate(
      model,
      params,
      plan,
      jnp.asarray(ids),
      jnp.asarray(ids > 0),
      max_new_tokens=max_new_tokens,
      num_beams=num_beams,
    )
    tokens, lengths = jax.device_get((result.tokens, result.lengths))
    for row in range(len(chunk)):
      out = [int(t) for t in tokens[row, : lengths[row]] if t != model.config.eos_token_id]
      texts.append(vocabulary.decode(out))
    done = min(i + batch_size, len(examples))
    rate = done / max(time.perf_counter() - start, 1e-9)
    log.info(
      "decoded %d/%d examples (%.1f examples/s, ETA %.0fs)",
      done,
      len(examples),
      rate,
      (len(examples) - done) / rate,
    )
  return texts


def evaluate(cfg) -> dict:
  """Decodes ``cfg.data.eval_split`` and writes predictions and metrics; returns the metrics."""
  experiment.validate_config(cfg)
  vocabulary = experiment.build_vocabulary(cfg)
  task = experiment.build_task(cfg, vocabulary)
  model, hf_params = experiment.build_model(cfg, vocabulary.vocab_size)
  if experiment.model_type(model) != "encdec":
    raise experiment.ConfigError(
      "modjax.evaluate scores encoder-decoder tasks; the configured model is decoder-only"
    )
  step, params = load_trained_params(cfg, model, hf_params)
  split, e = cfg.data.eval_split, cfg.eval
  examples = make_eval_examples(task, split, e.max_examples or None)
  if not examples:
    raise experiment.ConfigError(
      f"split {split!r} of task {cfg.data.task!r} has no examples to evaluate"
    )
  predictions = predict(
    model,
    params,
    vocabulary,
    examples,
    batch_size=e.batch_size,
    inputs_length=cfg.data.inputs_length,
    max_new_tokens=e.max_new_tokens,
    num_beams=e.num_beams,
  )
  references = [ex["targets"] for ex in examples]
  names = [n.strip() for n in e.metrics.split(",") if n.strip()]
  scores = {}
  for name in names:
    kwargs = {"tokenize": e.bleu_tokenize} if name == "bleu" else {}
    scores.update(getattr(metrics, name)(predictions, references, **kwargs))
  summary = {
    "step": step,
    "split": split,
    "task": cfg.data.task,
    "examples": len(examples),
    "num_beams": e.num_beams,
    **scores,
  }
  if jax.process_index() == 0:
    out = experiment.workdir(cfg) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{split}_step{step}"
    with (out / f"{stem}.predictions.jsonl").open("w") as f:
      for ex, pred in zip(examples, predictions, strict=True):
        f.write(
          json.dumps({"inputs": ex["inputs"], "target": ex["targets"], "prediction": pred}) + "\n"
        )
    (out / f"{stem}.metrics.json").write_text(json.dumps(summary, indent=2))
    log.info(
      "metrics at step %d on %d %s examples: %s",
      step,
      len(examples),
      split,
      {k: round(v, 2) for k, v in scores.items() if isinstance(v, float)},
    )
  return summary


def main(config):
  evaluate(config)


if __name__ == "__main__":
  from modjax import cli

  cli.define_config_flag()
  cli.run(main)
