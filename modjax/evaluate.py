"""Score a bank under a plan: teacher-forced cross-entropy and perplexity, and/or decoding with
ROUGE/BLEU.

  python -m modjax.evaluate --config configs/tiny.py --config.workdir=/tmp/modjax/tiny
  python -m modjax.evaluate --config configs/tiny.py --config.workdir=/tmp/modjax/tiny \\
      --plan short.json --config.eval.metrics=perplexity,rouge

What is scored comes from a directory alone, never from the training config or its optimizer:
``--bank DIR`` (a saved bank or a training workdir; default ``config.workdir``, whose latest good
checkpoint is merged with its frozen part) or ``--hf DIR`` (a ``save_pretrained`` directory; also
used when the workdir holds no bank and ``model.init_from`` is set). ``--plan`` is a plan saved in
the bank (by name) or a JSON plan file; default: the bank's "default" plan, else the identity.
The data and vocabulary come from the config (``data.vocab_path``, else the bank's or workdir's
trained ``vocab/spm.model``).
A Mixture-of-Modules bank (its ``entries.json`` records the MoM structure on its pools) runs
its routed forward, takes no ``--plan``, and is scored without capacity drops; its perplexity
comes with the router statistics (``router/...``, means over the scored tokens).

Metrics (``eval.metrics``, comma-separated): ``perplexity`` (mean cross-entropy per target token
over the first ``eval.max_examples`` examples, its exp, and the token count; T5 and GPT-2, which
reads the task's targets as text), ``rouge`` (1/2/L/Lsum, Lsum with newline-split sentences) and
``bleu`` (sacreBLEU on detokenised text); the last two decode and need an encoder-decoder.
Writes ``workdir/eval/<stem>.metrics.json`` and, when decoding, ``<stem>.predictions.jsonl``
(input, target, prediction per example), where ``<stem>`` is
``<split>[_step<N>][_plan-<name>][_draft-<name>-k<K>]_<bank|hf>-<dir>_data-<source>_<digest>`` and
the digest covers everything that changes the numbers (``modjax.store.results``: bank path and step,
plan, data files' contents or TFDS version, vocabulary, metrics, example limit, lengths, decoding
mode, beams). The metrics JSON records all of it under ``evaluation``. A different evaluation
never overwrites another's files; a rerun of the same one replaces its own and logs it. Both
files are written atomically (temporary file, then rename). The scoring itself is
``modjax.train.scoring`` (pure functions over model, params, plan and batches) and what is scored is
loaded by ``modjax.eval_inputs``; both re-exported here.

``--draft NAME [--draft-tokens K]``: greedy decoding by self-speculation
(``modjax.decoding.speculative``) with that plan of the bank (a saved name or a JSON file; for T5
only its decoder is used) drafting K tokens per round (default: the ``draft_tokens`` that
``python -m modjax.assemble draft`` recorded for NAME, else 4). The texts are those of plain
greedy decoding; the metrics add ``acceptance_rate``, ``mean_accepted_length`` and
``speculative`` (draft, K, counts), and the output names carry ``_draft-<name>-k<K>``. Beam
search stays plain: ``eval.num_beams`` > 1 with a draft is refused.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
from etils import epath

from modjax.core import metrics
from modjax.data import make_eval_examples
from modjax.eval_inputs import Draft, Scored, load_draft, load_scored
from modjax.store import results
from modjax.train import experiment
from modjax.train.experiment import load_eval_vocabulary
from modjax.train.scoring import make_eval_batches, predict, teacher_forced_metrics

__all__ = [
  "Draft",
  "Scored",
  "evaluate",
  "load_draft",
  "load_eval_vocabulary",
  "load_scored",
  "make_eval_batches",
  "predict",
  "teacher_forced_metrics",
]

log = logging.getLogger("modjax.evaluate")

DECODED_METRICS = ("rouge", "bleu")
TEACHER_FORCED_METRICS = ("perplexity",)


def _check_fit(cfg, names, model, vocabulary) -> None:
  if model.kind != "encdec" and set(names) & set(DECODED_METRICS):
    raise experiment.ConfigError(
      f"config.eval.metrics={cfg.eval.metrics!r}: rouge/bleu decode an encoder-decoder, and the "
      "bank holds a decoder-only model; use --config.eval.metrics=perplexity"
    )
  if model.config.vocab_size < vocabulary.vocab_size:
    raise experiment.ConfigError(
      f"the vocabulary ({vocabulary.vocab_size} pieces) is larger than the model's "
      f"({model.config.vocab_size}); set config.data.vocab_path to the bank's own vocabulary"
    )
  positions = getattr(model.config, "n_positions", None)
  if positions is not None and cfg.data.targets_length > positions:
    raise experiment.ConfigError(
      f"config.data.targets_length={cfg.data.targets_length} exceeds the model's "
      f"{positions} positions; use a length up to {positions}"
    )


# ---- the run ---------------------------------------------------------------------------------


def evaluate(
  cfg,
  *,
  bank: str | None = None,
  hf_dir: str | None = None,
  plan=None,
  draft: str | None = None,
  draft_tokens: int | None = None,
) -> dict:
  """Scores ``cfg.data.eval_split`` with the bank and plan (see the module docstring), writes
  the metrics (and predictions when decoding) under ``workdir/eval``; returns the metrics.
  ``draft``: decode greedily by self-speculation with that plan (same texts)."""
  experiment.validate_config(cfg)
  names = [n.strip() for n in cfg.eval.metrics.split(",") if n.strip()]
  if not names:
    raise experiment.ConfigError("config.eval.metrics is empty; name rouge, bleu or perplexity")
  _check_draft_fit(cfg, names, draft, draft_tokens)
  scored = load_scored(cfg, bank=bank, hf_dir=hf_dir, plan=plan)
  vocabulary = load_eval_vocabulary(cfg, scored.vocab_dir)
  _check_fit(cfg, names, scored.model, vocabulary)
  drafting = load_draft(scored, draft, draft_tokens) if draft is not None else None
  task = experiment.build_task(cfg, vocabulary)
  record = _evaluation_record(cfg, names, scored, vocabulary, drafting)
  paths = _claim_result_files(cfg, record)
  scored.params = jax.device_put(scored.params)
  log.info(
    "evaluating %s with plan %s: %s", scored.origin, scored.plan_name, scored.plan.describe()
  )
  scores, examples, predictions = {}, [], None
  if set(names) & set(TEACHER_FORCED_METRICS):
    scores.update(_teacher_forced_scores(cfg, scored, task))
  if set(names) & set(DECODED_METRICS):
    decoded, examples, predictions = _decoded_scores(cfg, names, scored, task, vocabulary, drafting)
    scores.update(decoded)
  summary = {
    "step": scored.step,
    "split": cfg.data.eval_split,
    "task": cfg.data.task,
    "bank": scored.origin,
    "plan_name": scored.plan_name,
    "plan": scored.plan.to_dict(),
    **scores,
    "evaluation": record,
    "digest": results.digest(record),
    "files": {"metrics": paths["metrics"].name},
  }
  if predictions is not None:
    summary["files"]["predictions"] = paths["predictions"].name
  if jax.process_index() == 0:
    _write(paths, summary, examples, predictions)
  return summary


def _teacher_forced_scores(cfg, scored: Scored, task) -> dict:
  model = scored.model
  batches = make_eval_batches(
    task,
    cfg.data.eval_split,
    feature_lengths=experiment.feature_lengths(cfg, model),
    batch_size=cfg.eval.batch_size,
    max_examples=cfg.eval.max_examples or None,
    model_type=model.kind,
  )
  if not batches:
    raise _no_examples(cfg)
  scores = teacher_forced_metrics(model, scored.params, scored.plan, batches)
  scores["examples"] = sum(int(np.any(b["decoder_loss_weights"], axis=1).sum()) for b in batches)
  return scores


def _check_draft_fit(cfg, names, draft, draft_tokens) -> None:
  """A draft only changes greedy decoding: refused without a decoded metric or with beams."""
  if draft is None:
    if draft_tokens is not None:
      raise experiment.ConfigError("--draft-tokens needs --draft PLAN (the plan that drafts)")
    return
  if cfg.eval.num_beams > 1:
    raise experiment.ConfigError(
      f"--draft decodes greedily and config.eval.num_beams={cfg.eval.num_beams} asks for beam "
      "search, which stays plain; set --config.eval.num_beams=1 or drop --draft"
    )
  if not set(names) & set(DECODED_METRICS):
    raise experiment.ConfigError(
      f"--draft speeds up decoding, and config.eval.metrics={cfg.eval.metrics!r} decodes "
      "nothing; add rouge or bleu, or drop --draft"
    )


def _decoded_scores(cfg, names, scored: Scored, task, vocabulary, drafting: Draft | None):
  """(ROUGE/BLEU scores, examples, predicted texts)."""
  e = cfg.eval
  examples = make_eval_examples(task, cfg.data.eval_split, e.max_examples or None)
  if not examples:
    raise _no_examples(cfg)
  predictions = predict(
    scored.model,
    scored.params,
    scored.plan,
    vocabulary,
    examples,
    batch_size=e.batch_size,
    inputs_length=cfg.data.inputs_length,
    max_new_tokens=e.max_new_tokens,
    num_beams=e.num_beams,
    draft_plan=drafting.plan if drafting else None,
    draft_tokens=drafting.tokens if drafting else 4,
  )
  references = [ex["targets"] for ex in examples]
  scores = {}
  for name in (n for n in names if n in DECODED_METRICS):
    kwargs = {"tokenize": e.bleu_tokenize} if name == "bleu" else {}
    scores.update(getattr(metrics, name)(predictions, references, **kwargs))
  scores.update(examples=len(examples), num_beams=e.num_beams)
  if drafting is not None:
    stats = predictions.speculative
    scores.update(
      acceptance_rate=stats["acceptance_rate"],
      mean_accepted_length=stats["mean_accepted_length"],
      speculative={
        "draft": drafting.name,
        "draft_plan": drafting.plan.to_dict(),
        "draft_tokens": drafting.tokens,
        **stats,
      },
    )
    log.info(
      "self-speculative decoding with draft %s (k=%d): acceptance rate %.3f, mean accepted "
      "length %.2f per round (%d rounds)",
      drafting.name,
      drafting.tokens,
      stats["acceptance_rate"],
      stats["mean_accepted_length"],
      stats["rounds"],
    )
  return scores, examples, predictions


def _no_examples(cfg):
  return experiment.ConfigError(
    f"split {cfg.data.eval_split!r} of task {cfg.data.task!r} has no examples to evaluate"
  )


def _evaluation_record(cfg, names, scored: Scored, vocabulary, drafting: Draft | None) -> dict:
  """What identifies this evaluation (``modjax.store.results``): the bank and plan, the data, and the
  settings that change the numbers of the metrics asked for."""
  d, e = cfg.data, cfg.eval
  data = results.data_record(
    d.task,
    d.eval_split,
    experiment.file_spec(cfg),
    vocabulary=vocabulary,
    inputs_prefix=d.inputs_prefix,
    fields=[d.inputs_field, d.targets_field] if d.task == "jsonl" else None,
    tfds_data_dir=d.tfds_data_dir,
  )
  settings = {"metrics": sorted(set(names)), "max_examples": e.max_examples or None}
  if set(names) & set(TEACHER_FORCED_METRICS):
    settings["feature_lengths"] = dict(experiment.feature_lengths(cfg, scored.model))
  if set(names) & set(DECODED_METRICS):
    mode = "speculative" if drafting else "beam" if e.num_beams > 1 else "greedy"
    settings.update(
      decoding=mode,
      num_beams=e.num_beams,
      inputs_length=d.inputs_length,
      max_new_tokens=e.max_new_tokens,
    )
    if "bleu" in names:
      settings["bleu_tokenize"] = e.bleu_tokenize
  if drafting is not None:
    plan_sha = results.plan_digest(drafting.plan)
    settings["draft"] = {"name": drafting.name, "sha256": plan_sha, "tokens": drafting.tokens}
  if scored.kind == "hf":  # a bank's dtypes are its own; an import's come from the config
    settings["dtypes"] = {"param": cfg.model.param_dtype, "compute": cfg.model.dtype}
  return results.as_stored(results.evaluation_record(scored, data=data, settings=settings))


def _claim_result_files(cfg, record: dict) -> dict[str, epath.Path]:
  """The metrics and predictions files of ``record`` under ``workdir/eval``. A metrics file
  there from this same evaluation is replaced (and the log says so); one that holds another
  record (a digest collision, or a file edited by hand) is an error, before anything runs."""
  out = experiment.workdir(cfg) / "eval"
  stem = results.result_stem(record, results.digest(record))
  paths = {
    "metrics": out / f"{stem}.metrics.json",
    "predictions": out / f"{stem}.predictions.jsonl",
  }
  if paths["metrics"].exists():
    if results.stored_record(paths["metrics"]) != record:
      raise experiment.ConfigError(
        f'{paths["metrics"]} exists and holds another evaluation\'s results (its "evaluation" '
        "record differs from this run's); move or delete it, then rerun"
      )
    log.info("replacing %s: it holds this same evaluation (bank, plan, data, settings)", out / stem)
  return paths


def _write(paths: dict, summary: dict, examples, predictions) -> None:
  """Predictions first, then the metrics, each written atomically: a metrics file is only ever
  there with its complete predictions beside it."""
  paths["metrics"].parent.mkdir(parents=True, exist_ok=True)
  if predictions is not None:
    results.write_atomically(paths["predictions"], _prediction_lines(examples, predictions))
  results.write_text_atomically(paths["metrics"], json.dumps(summary, indent=2))
  log.info(
    "metrics (step %s, plan %s) -> %s: %s",
    summary["step"],
    summary["plan_name"],
    paths["metrics"],
    {k: round(v, 4) for k, v in summary.items() if isinstance(v, float)},
  )


def _prediction_lines(examples, predictions):
  for ex, pred in zip(examples, predictions, strict=True):
    yield json.dumps({"inputs": ex["inputs"], "target": ex["targets"], "prediction": pred}) + "\n"


def define_flags() -> None:
  """``--bank``, ``--hf``, ``--plan``, ``--draft`` and ``--draft-tokens`` beside ``--config``
  (defined when run as a program)."""
  from absl import flags

  flags.DEFINE_string("bank", None, "A saved bank or training workdir (default: config.workdir).")
  flags.DEFINE_string("hf", None, "A Hugging Face save_pretrained directory to score instead.")
  flags.DEFINE_string("plan", None, "A plan saved in the bank (by name) or a JSON plan file.")
  flags.DEFINE_string(
    "draft", None, "Greedy self-speculative decoding with this plan (saved name or JSON file)."
  )
  flags.DEFINE_integer(
    "draft-tokens", None, "Tokens drafted per round (default: the assembly record's, else 4)."
  )


def main(config):
  from absl import flags

  f = flags.FLAGS
  evaluate(
    config,
    bank=f.bank,
    hf_dir=f.hf,
    plan=f.plan,
    draft=f.draft,
    draft_tokens=f["draft-tokens"].value,
  )


if __name__ == "__main__":
  from modjax.core import cli

  define_flags()
  cli.run(main)
