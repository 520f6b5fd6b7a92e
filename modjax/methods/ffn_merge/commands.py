"""The merge as one command: ``python -m modjax.merge`` (:func:`merge_bank`).

Loads a bank (a training workdir or a saved bank, under any of its plans: an assembled Modular
Transformers plan merges like the identity), collects the FFN features over ``calib_tokens``
tokens of the config's training split (permute only), merges a window of ``k`` at ``start`` or
at the best start (every candidate scored by teacher-forced cross-entropy on the config's
validation split before any training), and writes ``out``:

* the merged model as an Orbax bank of the entries the merged plan reads (each shared FFN
  stored once; the window blocks' own FFNs, which no slot reads any more, are left out), with the
  merged plan as ``default`` and ``merged``;
* ``vocab/`` copied from the source, so evaluation and recovery need no other directory;
* ``merge.json``: the inputs, every candidate's score, the original plan's score, parameter
  counts before and after, and the seconds each phase took.

Recovery fine-tuning is then ``python -m modjax.train --config configs/ffn_merge.py:...``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time

from etils import epath

from modjax import bank_io, cost, export, results, scoring
from modjax.methods.ffn_merge.align import reference_offset
from modjax.methods.ffn_merge.merge import METHODS, merge_windows
from modjax.methods.ffn_merge.window import (
  calibration_stats,
  candidate_starts,
  choose_window,
  resolve_stacks,
)
from modjax.plan import PlanError
from modjax.train import experiment

log = logging.getLogger(__name__)
MERGED_PLAN = "merged"


def check_inputs(k, method: str, start, calib_tokens: int) -> None:
  """One-line PlanError for arguments that cannot work, before anything is loaded."""
  if method not in METHODS:
    raise PlanError(f"--method {method!r} is unknown; use one of {METHODS}")
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise PlanError(f"--k {k!r} must be a positive integer (the FFNs merged into one)")
  if start != "auto" and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
    raise PlanError(f"--start {start!r} must be 'auto' or a non-negative layer index")
  if method == "permute" and (not isinstance(calib_tokens, int) or calib_tokens < 1):
    raise PlanError(f"--calib-tokens {calib_tokens!r} must be a positive integer")


def task_data(cfg, bank_dir, model):
  """(task, vocabulary) from the config, with the source bank's trained vocabulary."""
  from modjax import evaluate

  if not cfg.workdir:
    cfg.workdir = str(bank_dir)
  vocabulary = evaluate.load_eval_vocabulary(cfg, bank_dir)
  if model.config.vocab_size < vocabulary.vocab_size:
    raise experiment.ConfigError(
      f"the vocabulary ({vocabulary.vocab_size} pieces) is larger than the bank's model "
      f"({model.config.vocab_size}); set --config.data.vocab_path to the bank's vocabulary"
    )
  return experiment.build_task(cfg, vocabulary), vocabulary


def split_batches(cfg, task, model, split: str, max_examples: int | None) -> list[dict]:
  """Padded eval batches of ``split`` (at most ``max_examples``; None: all) at the config's
  lengths and ``eval.batch_size``."""
  batches = scoring.make_eval_batches(
    task,
    split,
    feature_lengths=experiment.feature_lengths(cfg, model),
    batch_size=cfg.eval.batch_size,
    max_examples=max_examples,
    model_type=experiment.model_type(model),
  )
  if not batches:
    raise experiment.ConfigError(f"split {split!r} of task {cfg.data.task!r} has no examples")
  return batches


def _calibration(cfg, task, model, params, plan, k, *, stacks, starts, reference, calib_tokens):
  """Feature statistics over at least ``calib_tokens`` real tokens of the training split."""
  lengths = experiment.feature_lengths(cfg, model)
  per_example = max(1, min(lengths.values()) // 4)  # generous: short examples need more
  examples = math.ceil(calib_tokens / per_example)
  batches = split_batches(cfg, task, model, cfg.data.train_split, examples)
  return calibration_stats(
    model, params, plan, batches, k, reference=reference, stacks=stacks, starts=starts,
    max_tokens=calib_tokens,
  )  # fmt: skip


def _merge(model, params, plan, k, *, start, method, stats, reference, stacks, val_batches):
  """(merged params, merged plan, chosen start, {start: metrics}) at ``start`` or the best."""
  if start == "auto":
    choice = choose_window(
      model, params, plan, k, val_batches=val_batches, method=method, stats=stats,
      reference=reference, stacks=stacks,
    )  # fmt: skip
    return choice.params, choice.plan, choice.start, choice.scores
  merged = merge_windows(
    model, params, plan, {s: start for s in stacks}, k,
    method=method, stats=stats, reference=reference,
  )  # fmt: skip
  scores = {start: scoring.teacher_forced_metrics(model, *merged, val_batches)}
  return *merged, start, scores


def merge_bank(
  bank_dir,
  cfg,
  out,
  *,
  k: int,
  method: str = "permute",
  start: int | str = "auto",
  stacks=None,
  reference: str = "first",
  calib_tokens: int = 10_000,
  plan: str | None = None,
) -> dict:
  """The merge command (module docstring); returns what ``merge.json`` holds."""
  check_inputs(k, method, start, calib_tokens)
  reference_offset(k, reference)
  export.check_output_dir(out)
  source = bank_io.load_bank(bank_dir)
  model, params = source.model, source.params
  input_plan = source.plan(plan)
  stacks = resolve_stacks(model, stacks)
  starts = candidate_starts(input_plan, stacks, k)
  if start != "auto" and start not in starts:
    raise PlanError(f"--start {start} does not fit a window of {k} in the stacks {list(stacks)}")
  task, _ = task_data(cfg, bank_dir, model)
  timings, t0 = {}, time.perf_counter()
  val_batches = split_batches(cfg, task, model, cfg.data.eval_split, cfg.eval.max_examples or None)
  stats = None
  if method == "permute":
    stats = _calibration(
      cfg, task, model, params, input_plan, k, stacks=stacks, reference=reference,
      starts=starts if start == "auto" else [start], calib_tokens=calib_tokens,
    )  # fmt: skip
    timings["features_s"] = time.perf_counter() - t0
  t1 = time.perf_counter()
  merged_params, merged_plan, chosen, scores = _merge(
    model, params, input_plan, k, start=start, method=method, stats=stats,
    reference=reference, stacks=stacks, val_batches=val_batches,
  )  # fmt: skip
  timings["merge_and_score_s"] = time.perf_counter() - t1
  original = scoring.teacher_forced_metrics(model, params, input_plan, val_batches)
  saved = export.export_bank_subset(
    out, model, merged_params, merged_plan, meta=source.meta, name=MERGED_PLAN
  )
  _copy_vocab((epath.Path(bank_dir), epath.Path(cfg.workdir)), epath.Path(out))
  record = {
    "source": str(bank_dir),
    "input_plan": plan or bank_io.DEFAULT_PLAN,
    "k": k,
    "method": method,
    "reference": reference,
    "stacks": list(stacks),
    "start": chosen,
    "calibration_tokens": None if stats is None else {s: stats.count[s] for s in stacks},
    "scores": {str(s): m for s, m in scores.items()},
    "original": original,
    "params": _param_counts(model, params, input_plan, saved, merged_plan),
    "plan": merged_plan.to_dict(),
    "timings_s": timings,
  }
  results.write_text_atomically(epath.Path(out) / "merge.json", json.dumps(record, indent=1))
  log.info(
    "merged %s window %d..%d of %s (%s): cross-entropy %.4f (original %.4f) -> %s",
    method, chosen, chosen + k - 1, list(stacks), record["params"]["fraction"],
    scores[chosen]["cross_entropy"], original["cross_entropy"], out,
  )  # fmt: skip
  return record


def _param_counts(model, params, input_plan, saved, merged_plan) -> dict:
  before = sum(cost.count_params(model, input_plan, params).values())
  after = sum(cost.count_params(model, merged_plan, saved).values())
  return {"original": before, "merged": after, "fraction": round(after / before, 4)}


def _copy_vocab(sources, out: epath.Path) -> None:
  """The first of ``sources``' trained ``vocab/`` (the one the merge read), if any."""
  for source in sources:
    if (source / "vocab" / "spm.model").exists():
      shutil.copytree(source / "vocab", out / "vocab")
      return
