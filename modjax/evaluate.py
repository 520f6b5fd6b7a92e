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
Writes ``workdir/eval/<split>_step<N>[_plan-<name>].metrics.json`` (with the plan) and, when
decoding, ``.predictions.jsonl`` (input, target, prediction per example). The scoring itself is
``modjax.scoring`` (pure functions over model, params, plan and batches), re-exported here.

``--draft NAME [--draft-tokens K]``: greedy decoding by self-speculation (``modjax.speculative``)
with that plan of the bank (a saved name or a JSON file; for T5 only its decoder is used)
drafting K tokens per round (default: the ``draft_tokens`` that ``python -m modjax.assemble
draft`` recorded for NAME, else 4). The texts are those of plain greedy decoding; the metrics add
``acceptance_rate``, ``mean_accepted_length`` and ``speculative`` (draft, K, counts), and the
output names end in ``_draft-<name>-k<K>``. Beam search stays plain: ``eval.num_beams`` > 1 with
a draft is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from modjax import bank_io, metrics
from modjax.checkpoint import CheckpointError
from modjax.data import make_eval_examples, vocab
from modjax.interop import hf
from modjax.methods.mom.model import bank_model
from modjax.models import architecture_for
from modjax.plan import Plan, PlanError
from modjax.scoring import make_eval_batches, predict, teacher_forced_metrics
from modjax.train import experiment

__all__ = [
  "evaluate",
  "load_eval_vocabulary",
  "load_scored",
  "make_eval_batches",
  "predict",
  "teacher_forced_metrics",
]

log = logging.getLogger("modjax.evaluate")

DECODED_METRICS = ("rouge", "bleu")
TEACHER_FORCED_METRICS = ("perplexity",)


# ---- what is scored: bank, plan, vocabulary --------------------------------------------------


@dataclasses.dataclass
class Scored:
  """A model with its parameters and the plan to run, and where they came from."""

  model: object
  params: dict
  plan: Plan
  plan_name: str  # a saved plan's name, "identity", or the plan file as given
  step: int | None  # training step of a workdir; 0 for an HF checkpoint; None for a saved bank
  origin: str  # the bank or HF directory
  vocab_dir: epath.Path | None  # where a trained vocab/spm.model may be
  default_plan: bool  # the plan is the bank's default (output names carry no plan suffix)


def load_scored(cfg, *, bank: str | None = None, hf_dir: str | None = None, plan=None) -> Scored:
  """The bank (``bank``, else ``hf_dir``, else the config's workdir, else ``model.init_from``)
  and the plan (a saved name or a JSON file; None: the default). Reads, never writes."""
  if bank and hf_dir:
    raise experiment.ConfigError("give --bank or --hf, not both")
  root = epath.Path(bank) if bank else None if hf_dir else experiment.workdir(cfg)
  if root is not None and not bank_io.is_bank(root) and not bank and cfg.model.init_from:
    root, hf_dir = None, cfg.model.init_from  # a workdir not trained yet: score the HF weights
  stored = bank_io.load_bank(root) if root is not None and bank_io.is_bank(root) else None
  if stored is not None and bank_model(stored.model, stored.meta) is not stored.model:
    return _mom_scored(stored, plan, root)
  file_plan = _plan_file(plan, root)
  if root is None:
    return _load_hf(cfg, hf_dir, plan, file_plan)
  if stored is None:
    raise CheckpointError(
      f"no checkpoint in {root}: it holds no model.json (not a modjax bank or training "
      "workdir); train first, or give --bank DIR or --hf DIR"
    )
  if file_plan is not None:
    chosen = _validated(file_plan, stored.params, stored.model, plan)
  else:
    chosen = stored.plan(plan)
  name = plan or (bank_io.DEFAULT_PLAN if bank_io.DEFAULT_PLAN in stored.plans else "identity")
  default = plan in (None, bank_io.DEFAULT_PLAN) or chosen == stored.plan()
  return Scored(stored.model, stored.params, chosen, name, stored.step, str(root), root, default)


def _mom_scored(stored: bank_io.StoredBank, plan, root) -> Scored:
  """A Mixture-of-Modules bank runs its routed structure (its entries record it), not a plan."""
  if plan is not None:
    raise PlanError(
      f"--plan {plan}: a Mixture-of-Modules bank runs its routed structure, not a plan; drop --plan"
    )
  model = bank_model(stored.model, stored.meta)
  return Scored(
    model, stored.params, model.identity_plan(), "mom", stored.step, str(root), root, True
  )


def _plan_file(value, root, flag: str = "--plan") -> Plan | None:
  """The plan in file ``value``, or None when ``value`` names a plan saved in the bank."""
  if value is None:
    return None
  saved = sorted(p.stem for p in (root / "plans").glob("*.json")) if root is not None else []
  if value in saved:
    return None
  if not os.path.isfile(value):
    raise PlanError(
      f"{flag} {value!r} is neither a plan saved in the bank (it has {saved}) nor a JSON file"
    )
  try:
    return bank_io.read_plan_file(value)
  except PlanError as e:
    raise PlanError(f"{flag} {value}: {e}") from None


def _validated(plan: Plan, params, model, label, flag: str = "--plan") -> Plan:
  try:
    return plan.validate(params, model.stacks)
  except PlanError as e:
    raise PlanError(
      f"{flag} {label} does not fit the bank: {e}{_stack_hint(plan, params)}"
    ) from None


def _stack_hint(plan: Plan, params) -> str:
  """Names a block the plan puts in one stack that only the other stack has."""
  for stack, other in (("encoder", "decoder"), ("decoder", "encoder")):
    mine = params.get(stack, {}).get("blocks", {})
    theirs = params.get(other, {}).get("blocks", {})
    for slot in plan.stack(stack):
      if slot.block not in mine and slot.block in theirs:
        article = "an" if other == "encoder" else "a"
        return (
          f" ({slot.block!r} is {article} {other} block; each stack's slots name its own blocks)"
        )
  return ""


def _load_hf(cfg, hf_dir, plan_label, file_plan) -> Scored:
  config, params = hf.import_checkpoint(hf_dir, cfg.model.param_dtype, cfg.model.dtype)
  model = architecture_for(config)
  params = jax.tree.map(jnp.asarray, params)
  chosen = model.identity_plan() if file_plan is None else file_plan
  chosen = _validated(chosen, params, model, plan_label)
  name = plan_label or "identity"
  return Scored(model, params, chosen, name, 0, hf_dir, None, chosen == model.identity_plan())


@dataclasses.dataclass(frozen=True)
class Draft:
  """A draft plan for self-speculative greedy decoding, and how many tokens it drafts."""

  plan: Plan
  name: str  # a saved plan's name, or the plan file as given
  tokens: int


def load_draft(scored: Scored, draft: str, draft_tokens: int | None = None) -> Draft:
  """The draft plan ``draft`` (a name saved in the scored bank, or a JSON plan file) checked
  against the bank; ``draft_tokens`` None: what ``assembly/<draft>.json`` recorded, else 4."""
  root = epath.Path(scored.origin) if scored.vocab_dir is not None else None
  plan = _plan_file(draft, root, flag="--draft")
  if plan is None:
    plan = bank_io.read_plan_file(root / "plans" / f"{draft}.json")
  if "encoder" in scored.model.stacks:  # T5 drafts with its decoder over the full encoder
    plan = Plan(encoder=scored.plan.encoder, decoder=plan.decoder)
  plan = _validated(plan, scored.params, scored.model, draft, flag="--draft")
  if draft_tokens is None:
    record = root / "assembly" / f"{draft}.json" if root is not None else None
    recorded = json.loads(record.read_text()) if record and record.exists() else {}
    draft_tokens = recorded.get("draft_tokens", 4)
  if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
    raise experiment.ConfigError(f"--draft-tokens must be an integer >= 1, got {draft_tokens!r}")
  return Draft(plan, draft, draft_tokens)


def load_eval_vocabulary(cfg, vocab_dir=None):
  """``data.vocab_path``, else the ``vocab/spm.model`` trained into the bank or the workdir.
  Never trains one: a new vocabulary would not match the model's embeddings."""
  d = cfg.data
  if d.vocab_path:
    return vocab.load_vocabulary(
      d.vocab_path, extra_ids=d.extra_ids, expected_size=d.expected_vocab_size or None
    )
  for root in (vocab_dir, experiment.workdir(cfg)):
    if root is not None and (epath.Path(root) / "vocab" / "spm.model").exists():
      return vocab.load_vocabulary(os.fspath(epath.Path(root) / "vocab" / "spm.model"), extra_ids=0)
  raise experiment.ConfigError(
    "config.data.vocab_path is empty and neither the bank nor the workdir holds vocab/spm.model; "
    "set --config.data.vocab_path to the SentencePiece model the bank was trained with"
  )


def _check_fit(cfg, names, model, vocabulary) -> None:
  if experiment.model_type(model) != "encdec" and set(names) & set(DECODED_METRICS):
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
  }
  if jax.process_index() == 0:
    _write(cfg, scored, summary, examples, predictions)
  return summary


def _teacher_forced_scores(cfg, scored: Scored, task) -> dict:
  model = scored.model
  batches = make_eval_batches(
    task,
    cfg.data.eval_split,
    feature_lengths=experiment.feature_lengths(cfg, model),
    batch_size=cfg.eval.batch_size,
    max_examples=cfg.eval.max_examples or None,
    model_type=experiment.model_type(model),
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


def output_stem(split: str, scored: Scored, draft: dict | None = None) -> str:
  """``<split>[_step<N>][_plan-<name>][_draft-<name>-k<K>]``: a file plan is named by its file
  and a digest; ``draft`` is a summary's ``speculative`` record."""
  stem = split if scored.step is None else f"{split}_step{scored.step}"
  if not scored.default_plan:
    stem += f"_plan-{_file_label(scored.plan_name, scored.plan)}"
  if draft:
    label = _file_label(draft["draft"], Plan.from_dict(draft["draft_plan"]))
    stem += f"_draft-{label}-k{draft['draft_tokens']}"
  return stem


def _file_label(label: str, plan: Plan) -> str:
  if os.path.isfile(label):
    digest = hashlib.sha256(plan.to_json().encode()).hexdigest()[:8]
    label = f"{epath.Path(label).stem}-{digest}"
  return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def _write(cfg, scored, summary, examples, predictions) -> None:
  out = experiment.workdir(cfg) / "eval"
  out.mkdir(parents=True, exist_ok=True)
  stem = output_stem(summary["split"], scored, summary.get("speculative"))
  if predictions is not None:
    with (out / f"{stem}.predictions.jsonl").open("w") as f:
      for ex, pred in zip(examples, predictions, strict=True):
        f.write(
          json.dumps({"inputs": ex["inputs"], "target": ex["targets"], "prediction": pred}) + "\n"
        )
  (out / f"{stem}.metrics.json").write_text(json.dumps(summary, indent=2))
  log.info(
    "metrics (step %s, plan %s) -> %s: %s",
    scored.step,
    scored.plan_name,
    out / f"{stem}.metrics.json",
    {k: round(v, 4) for k, v in summary.items() if isinstance(v, float)},
  )


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
  from modjax import cli

  cli.define_config_flag()
  define_flags()
  cli.run(main)
