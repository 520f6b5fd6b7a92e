"""What the DDTP-summ comparison scripts share: the teacher recipe's validation examples, a
plan's greedy ROUGE on them, a run's ``compute.json`` budget, and the results/table/plot
writing of their ``main``. A script beside this folder imports it after
``sys.path.insert(0, <experiments folder>)``."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable

from modjax.core import metrics
from modjax.core.plan import Plan
from modjax.data import make_eval_examples
from modjax.models import cost
from modjax.train import experiment, scoring

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ddtp_summ.py")


def eval_setup(data: str, vocab_dir: str, max_examples: int):
  """(config, vocabulary, validation examples) of the 6+6 teacher's recipe on ``data``, with
  the teacher's SentencePiece model from ``vocab_dir`` (its run folder)."""
  spec = importlib.util.spec_from_file_location("ddtp_summ", CONFIG)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  cfg = recipe.get_config(f"{data},6")
  cfg.data.vocab_path = os.path.join(vocab_dir, "vocab", "spm.model")
  cfg.data.extra_ids = 0
  vocabulary = experiment.build_vocabulary(cfg)
  task = experiment.build_task(cfg, vocabulary)
  return cfg, vocabulary, make_eval_examples(task, cfg.data.eval_split, max_examples or None)


def score(stored, plan: Plan, setup, batch_size: int) -> dict:
  """Greedy ROUGE of ``plan`` over the bank ``stored`` on the setup's examples, its parameter
  count (millions), decoding seconds and the first prediction."""
  cfg, vocabulary, examples = setup
  start = time.perf_counter()
  predictions = scoring.predict(
    stored.model, stored.params, plan, vocabulary, examples, batch_size=batch_size,
    inputs_length=cfg.data.inputs_length, max_new_tokens=cfg.eval.max_new_tokens, num_beams=1,
  )  # fmt: skip
  result = metrics.rouge(predictions, [ex["targets"] for ex in examples])
  result["decode_s"] = time.perf_counter() - start
  result["params_m"] = sum(cost.count_params(stored.model, plan).values()) / 1e6
  return result | {"example": predictions[0]}


def read_compute(workdir: str) -> dict | None:
  """A run's ``compute.json`` (budget), or None while it trains (written when it finishes)."""
  path = os.path.join(workdir, "compute.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_report(
  args, evaluate: Callable[[], tuple[list[dict], int, dict]], markdown, plot
) -> None:
  """``results.json`` from ``evaluate()`` (rows, examples, extra fields), or read back with
  ``--replot``; then ``results.md`` (``markdown(rows, examples)``), ``pareto.png``
  (``plot(rows, path)``) and the table on stdout, all in ``args.out``."""
  results = os.path.join(args.out, "results.json")
  if args.replot:
    with open(results) as f:
      saved = json.load(f)
    rows, examples = saved["rows"], saved["examples"]
  else:
    rows, examples, extra = evaluate()
    os.makedirs(args.out, exist_ok=True)
    with open(results, "w") as f:
      json.dump({"examples": examples, "rows": rows, **extra}, f, indent=1)
  table = markdown(rows, examples)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table + "\n")
  plot(rows, os.path.join(args.out, "pareto.png"))
  print(table)


def cached_row(path: str, key: dict, make_row: Callable[[], dict]) -> dict:
  """The row saved at ``path`` when its ``key`` (checkpoint step, plan, examples) is ``key``,
  else ``make_row()`` saved there with the key: a rerun scores only what changed."""
  if os.path.exists(path):
    with open(path) as f:
      row = json.load(f)
    if row.get("key") == key:
      return row
  row = make_row() | {"key": key}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(row, f, indent=1)
  return row
