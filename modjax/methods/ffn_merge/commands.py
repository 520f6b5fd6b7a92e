"""The merge as one command: ``python -m modjax.merge`` (:func:`merge_bank`).

Loads a model (a bank or a training workdir under any of its plans: an assembled Modular
Transformers plan merges like the identity; or a Hugging Face ``save_pretrained`` directory),
collects the FFN features (of the gate or, for a gated FFN, the up branch) over ``calib_tokens``
tokens of the config's training split (permute only), merges (or, for ``drop``, removes) the
windows asked for: one window of ``k`` at ``start`` (one index for every stack, or one per stack)
or at the best start (every candidate scored by teacher-forced cross-entropy on the config's
validation split before any training), or explicit ``windows`` (several per stack, each stack its
own; ``modjax.methods.ffn_merge.ranges``). Writes ``out``:

* the merged model as an Orbax bank of the entries the merged plan reads (each shared FFN
  stored once; the window blocks' own FFNs, which no slot reads any more, are left out), with the
  merged plan as ``default`` and ``merged``;
* ``vocab/`` copied from the source (a bank's ``vocab/``, a Hugging Face directory's
  ``tokenizer.json``), so evaluation and recovery need no other directory;
* ``merge.json``: the inputs, the windows merged or the layers dropped, every candidate's score,
  the original plan's score, exact parameter counts before and after and their ratio, and the
  seconds each phase took.

Recovery fine-tuning is then ``python -m modjax.train --config configs/ffn_merge.py:...``.
"""

from __future__ import annotations

import json
import logging
import math
import time

from etils import epath

from modjax.core.plan import PlanError
from modjax.core.run_config import with_values
from modjax.methods.ffn_merge import ranges
from modjax.methods.ffn_merge.align import reference_offset
from modjax.methods.ffn_merge.features import BRANCHES, check_branch
from modjax.methods.ffn_merge.merge import METHODS, dropped_layers, merge_ranges
from modjax.methods.ffn_merge.source import copy_vocabulary, load_source
from modjax.methods.ffn_merge.window import (
  calibration_stats,
  candidate_starts,
  choose_window,
  resolve_stacks,
)
from modjax.models import cost
from modjax.store import bank_io, export, results
from modjax.train import experiment, scoring

log = logging.getLogger(__name__)
MERGED_PLAN = "merged"


def check_inputs(k, method: str, start, calib_tokens: int, features: str = "gate") -> None:
  """One-line PlanError for arguments that cannot work, before anything is loaded."""
  if method not in METHODS:
    raise PlanError(f"--method {method!r} is unknown; use one of {METHODS}")
  if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
    raise PlanError(f"--k {k!r} must be a positive integer (the FFNs merged into one)")
  if isinstance(start, bool) or (isinstance(start, int) and start < 0):
    raise PlanError(f"--start {start!r} must be 'auto' or a non-negative layer index")
  if method == "permute" and (not isinstance(calib_tokens, int) or calib_tokens < 1):
    raise PlanError(f"--calib-tokens {calib_tokens!r} must be a positive integer")
  if features not in BRANCHES:
    raise PlanError(f"--features {features!r} is unknown; use one of {tuple(BRANCHES)}")


def resolve_windows(plan, model, stacks, k, start, windows) -> str | ranges.Windows:
  """``"auto"`` or the checked windows: explicit ``windows`` (a mapping, or ``--windows`` values),
  else one window of ``k`` at ``start`` (an index, ``{stack: index}``, or ``--start`` text)."""
  if windows is not None:
    if start != "auto" or k is not None:
      raise PlanError("give --windows, or --k with --start, not both")
    if not isinstance(windows, dict):
      windows = ranges.parse_windows(list(windows), stacks)
    return ranges.check_windows(plan, model.stacks, windows)
  k = 2 if k is None else k
  candidate_starts(plan, stacks, k)  # k fits every merged stack
  if start == "auto":
    return "auto"
  if isinstance(start, str):
    start = ranges.parse_start(start, stacks, k)
  if isinstance(start, int):
    start = ranges.windows_at(stacks, start, k)
  elif not isinstance(start, dict):
    raise PlanError(f"--start {start!r} must be 'auto', a layer index, or {{stack: index}}")
  else:
    start = {s: v if isinstance(v, tuple) else ((v, v + k),) for s, v in start.items()}
  try:
    return ranges.check_windows(plan, model.stacks, start)
  except PlanError as e:
    raise PlanError(f"--start does not fit a window of {k}: {e}") from None


def task_data(cfg, bank_dir, model):
  """(task, vocabulary) from the config, with the source bank's trained vocabulary."""

  if not cfg.workdir:  # where load_eval_vocabulary looks after the bank (in a copy of cfg)
    cfg = with_values(cfg, {"workdir": str(bank_dir)})
  vocabulary = experiment.load_eval_vocabulary(cfg, bank_dir)
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
    model_type=model.kind,
  )
  if not batches:
    raise experiment.ConfigError(f"split {split!r} of task {cfg.data.task!r} has no examples")
  return batches


def _calibration(cfg, task, model, params, plan, k, *, windows, stacks, reference, calib_tokens,
                 branch):  # fmt: skip
  """Feature statistics over at least ``calib_tokens`` real tokens of the training split, with
  the cross sums of ``windows`` (or, for ``"auto"``, of every window of ``k`` in ``stacks``)."""
  lengths = experiment.feature_lengths(cfg, model)
  per_example = max(1, min(lengths.values()) // 4)  # generous: short examples need more
  examples = math.ceil(calib_tokens / per_example)
  batches = split_batches(cfg, task, model, cfg.data.train_split, examples)
  return calibration_stats(
    model, params, plan, batches, k, reference=reference, stacks=stacks,
    windows=None if windows == "auto" else windows, max_tokens=calib_tokens, branch=branch,
  )  # fmt: skip


def _merge(model, params, plan, k, *, windows, method, stats, reference, stacks, val_batches):
  """(merged params, merged plan, windows, {label: metrics}) for ``windows``, or for
  ``"auto"`` the best window of ``k`` (scores keyed by start)."""
  if windows == "auto":
    choice = choose_window(
      model, params, plan, k, val_batches=val_batches, method=method, stats=stats,
      reference=reference, stacks=stacks,
    )  # fmt: skip
    chosen = ranges.windows_at(stacks, choice.start, k)
    return choice.params, choice.plan, chosen, {str(s): m for s, m in choice.scores.items()}
  merged = merge_ranges(model, params, plan, windows, method=method, stats=stats,
                        reference=reference)  # fmt: skip
  start = ranges.common_start(windows)
  key = str(start) if start is not None else ranges.label(windows)
  return *merged, windows, {key: scoring.teacher_forced_metrics(model, *merged, val_batches)}


def merge_bank(
  bank_dir,
  cfg,
  out,
  *,
  k: int | None = None,
  method: str = "permute",
  start="auto",
  windows=None,
  stacks=None,
  reference: str = "first",
  features: str = "gate",
  calib_tokens: int = 10_000,
  plan: str | None = None,
  hf_only: bool = False,
) -> dict:
  """The merge command (module docstring); returns what ``merge.json`` holds.

  ``bank_dir``: a bank, a workdir or a Hugging Face directory (``hf_only``: only that). One
  window of ``k`` (default 2) at ``start`` (``"auto"``, an index, ``{stack: index}`` or the
  ``--start`` text), or ``windows`` (``{stack: ((start, stop), ...)}`` or ``--windows`` values);
  for ``"drop"`` the windows' layers are removed. ``features``: the FFN branch aligned on."""
  check_inputs(k, method, start, calib_tokens, features)
  export.check_output_dir(out)
  source = load_source(bank_dir, cfg, plan, hf_only=hf_only)
  model, params, input_plan = source.model, source.params, source.plan
  stacks, chosen = _checked_windows(source, k, start, windows, stacks, reference)
  if method == "permute":
    check_branch(model, features)
  task, _ = task_data(cfg, bank_dir, model)
  timings, t0 = {}, time.perf_counter()
  val_batches = split_batches(cfg, task, model, cfg.data.eval_split, cfg.eval.max_examples or None)
  stats = None
  if method == "permute":
    stats = _calibration(
      cfg, task, model, params, input_plan, k or 2, windows=chosen, stacks=stacks,
      reference=reference, calib_tokens=calib_tokens, branch=features,
    )  # fmt: skip
    timings["features_s"] = time.perf_counter() - t0
  t1 = time.perf_counter()
  merged_params, merged_plan, chosen, scores = _merge(
    model, params, input_plan, k or 2, windows=chosen, method=method, stats=stats,
    reference=reference, stacks=stacks, val_batches=val_batches,
  )  # fmt: skip
  timings["merge_and_score_s"] = time.perf_counter() - t1
  original = scoring.teacher_forced_metrics(model, params, input_plan, val_batches)
  saved = export.export_bank_subset(
    out, model, merged_params, merged_plan, meta=source.meta, name=MERGED_PLAN
  )
  copy_vocabulary((bank_dir, cfg.workdir), out)
  record = _record(bank_dir, source.kind, plan, method, reference, stacks, chosen, stats)
  record.update(
    features=features if method == "permute" else None,
    scores=scores,
    original=original,
    params=_param_counts(model, params, input_plan, saved, merged_plan),
    plan=merged_plan.to_dict(),
    timings_s=timings,
  )
  results.write_text_atomically(epath.Path(out) / "merge.json", json.dumps(record, indent=1))
  _log_merge(method, chosen, record, scores, original, out)
  return record


def _checked_windows(source, k, start, windows, stacks, reference):
  """(stacks, windows or "auto") the merge runs over, each window size checked against the
  reference FFN's offset."""
  model, input_plan = source.model, source.plan
  stacks = resolve_stacks(model, stacks)
  chosen = resolve_windows(input_plan, model, stacks, k, start, windows)
  if chosen != "auto":
    stacks = tuple(chosen)
  sizes = [k or 2] if chosen == "auto" else ranges.window_sizes(chosen)
  for size in sizes:
    reference_offset(size, reference)
  return stacks, chosen


def _log_merge(method, chosen, record, scores, original, out) -> None:
  best = min(scores.values(), key=lambda m: m["cross_entropy"])  # auto keeps the best
  log.info(
    "%s %s (parameters %.4f of the original): cross-entropy %.4f (original %.4f) -> %s",
    method, ranges.label(chosen), record["params"]["fraction"], best["cross_entropy"],
    original["cross_entropy"], out,
  )  # fmt: skip


def _record(source, kind, plan, method, reference, stacks, windows, stats) -> dict:
  """The inputs and what was merged or dropped: ``windows`` ({stack: [[start, stop], ...]}),
  ``k`` and ``start`` when every window has the same (else None), ``dropped_layers``."""
  sizes = set(ranges.window_sizes(windows))
  return {
    "source": str(source),
    "source_kind": kind,
    "input_plan": plan or bank_io.DEFAULT_PLAN,
    "k": sizes.pop() if len(sizes) == 1 else None,
    "method": method,
    "reference": reference,
    "stacks": list(stacks),
    "start": ranges.common_start(windows),
    "windows": ranges.as_json(windows),
    "dropped_layers": (
      {s: list(p) for s, p in dropped_layers(windows).items()} if method == "drop" else {}
    ),
    "calibration_tokens": None if stats is None else {s: stats.count[s] for s in stacks},
  }


def _param_counts(model, params, input_plan, saved, merged_plan) -> dict:
  """Exact counts of what each plan reads, and their ratio (not rounded)."""
  before = sum(cost.count_params(model, input_plan, params).values())
  after = sum(cost.count_params(model, merged_plan, saved).values())
  return {"original": before, "merged": after, "fraction": after / before}
