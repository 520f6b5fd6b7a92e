"""Scoring a model under a plan: pure functions over (model, params, plan, batches or examples),
so methods can score windows, plans and pools in Python without the ``modjax.evaluate`` program.

* :func:`teacher_forced_metrics`: mean cross-entropy per target token, perplexity, token count
  (T5 on seqio EncDec batches, GPT-2 on Decoder batches), with the training loss functions.
* :func:`make_eval_batches`: every example of a split (up to a limit) as fixed-shape batches.
* :func:`predict`: cached decoding of examples into texts, for ROUGE/BLEU (greedy, beam search,
  or greedy self-speculative with a draft plan of the same bank: same texts, fewer full steps).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from modjax import decoding
from modjax.core.plan import Plan
from modjax.core.progress import Progress
from modjax.data import DataError
from modjax.train import losses

if TYPE_CHECKING:
  import seqio

log = logging.getLogger("modjax.evaluate")
_LOG_FLOAT_MAX = math.log(sys.float_info.max)  # exp() of more overflows


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss_sums(model, plan: Plan, params, batch):
  """(weighted CE sum, weight sum, {statistic: mean over the batch's target tokens}) of one
  batch through the model's scoring forward (``Architecture.score_batch``: a Mixture-of-Modules
  model runs without capacity drops and reports router statistics); compiled once per (model,
  plan, batch shape)."""
  logits, stats = model.score_batch(params, plan, batch)
  weights = batch["decoder_loss_weights"]
  return (*losses.cross_entropy(logits, batch["decoder_target_tokens"], weights), stats)


def teacher_forced_metrics(model, params, plan: Plan, batches) -> dict:
  """Mean cross-entropy per target token over ``batches`` (seqio EncDec batches for T5,
  Decoder batches for GPT-2 and Mixture-of-Modules), its exp (perplexity) and the number of
  tokens, plus any statistics the model reports (a MoM bank's ``router/...``), averaged over
  the target tokens.

  Tokens count by ``decoder_loss_weights``, so padding (and whole padding rows) adds nothing:
  the result does not depend on how the examples were cut into batches. Sums are carried across
  batches in float64 on the host."""
  decoding.validate_plan(model, params, plan)
  total, tokens, stats = 0.0, 0.0, {}
  for batch in batches:
    loss_sum, weight_sum, means = jax.device_get(_loss_sums(model, plan, params, _as_jax(batch)))
    total += float(loss_sum)
    tokens += float(weight_sum)
    for name, mean in means.items():
      stats[name] = stats.get(name, 0.0) + float(mean) * float(weight_sum)
  if tokens <= 0:
    raise DataError("the batches hold no target tokens to score; check the split and lengths")
  cross_entropy = total / tokens
  # A diverged model's perplexity overflows a float: it is reported as inf, not raised.
  perplexity = math.exp(cross_entropy) if cross_entropy < _LOG_FLOAT_MAX else math.inf
  scores = {"cross_entropy": cross_entropy, "perplexity": perplexity, "tokens": tokens}
  return {**scores, **{name: value / tokens for name, value in stats.items()}}


def _as_jax(batch) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def make_eval_batches(
  task: seqio.Task, split: str, *, feature_lengths, batch_size, max_examples=None, model_type
) -> list[dict]:
  """The first ``max_examples`` examples of ``split`` (file order, every one of them) through
  seqio's unpacked feature converter, in batches of ``batch_size`` rows; the last batch is
  filled with all-zero rows (weight 0) so every batch has one shape and compiles once."""
  import seqio  # already imported (with TF's GPUs hidden) by the data layer that made ``task``

  dataset = task.get_dataset(
    sequence_length=dict(feature_lengths), split=split, shuffle=False, seed=None, num_epochs=1
  )
  if max_examples:
    dataset = dataset.take(max_examples)
  converter = (
    seqio.EncDecFeatureConverter(pack=False)
    if model_type == "encdec"
    else seqio.DecoderFeatureConverter(pack=False)
  )
  dataset = converter(dataset, dict(feature_lengths)).batch(batch_size, drop_remainder=False)
  out = []
  for batch in dataset.as_numpy_iterator():
    rows = next(iter(batch.values())).shape[0]
    out.append(
      {
        k: np.pad(np.asarray(v, np.int32), [(0, batch_size - rows), (0, 0)])
        for k, v in batch.items()
      }
    )
  return out


# ---- decoding --------------------------------------------------------------------------------


class Predictions(list):
  """Decoded texts, in order. ``speculative``: when a draft plan decoded them, the draft's
  totals over the examples (padding rows excluded): ``SpeculativeStats.as_dict()``, else None."""

  speculative: dict | None = None


def input_batches(examples, *, batch_size, inputs_length):
  """(ids [batch_size, inputs_length], number of real rows) per batch of ``examples``: inputs
  right-padded (pad id 0) and the last batch filled with empty rows, so decoding compiles once."""
  for i in range(0, len(examples), batch_size):
    chunk = examples[i : i + batch_size]
    ids = np.zeros((batch_size, inputs_length), np.int32)
    for row, ex in enumerate(chunk):
      seq = np.asarray(ex["inputs_ids"][:inputs_length])
      ids[row, : len(seq)] = seq
    yield ids, len(chunk)


def predict(
  model,
  params,
  plan: Plan,
  vocabulary,
  examples,
  *,
  batch_size,
  inputs_length,
  max_new_tokens,
  num_beams,
  draft_plan: Plan | None = None,
  draft_tokens: int = 4,
) -> Predictions:
  """Decoded texts for ``examples`` (dicts with ``inputs_ids``) under ``plan``, in order. Inputs
  are padded to ``inputs_length`` and batches to ``batch_size`` so decoding compiles once.
  ``draft_plan``: greedy decoding by self-speculation (``modjax.decoding.speculative``), which
  gives the same texts; its acceptance statistics are in the result's ``speculative``. The plan
  is checked by ``generate`` (before the first batch is traced)."""
  prepared = decoding.prepare(model, params)
  texts = Predictions()
  totals = np.zeros(3, np.int64)  # rounds, drafted, accepted
  progress = Progress("decoded", len(examples), "examples", logger=log)
  for ids, rows in input_batches(examples, batch_size=batch_size, inputs_length=inputs_length):
    result = decoding.generate(
      model,
      params,
      plan,
      jnp.asarray(ids),
      jnp.asarray(ids > 0),
      max_new_tokens=max_new_tokens,
      num_beams=num_beams,
      prepared=prepared,
      draft_plan=draft_plan,
      draft_tokens=draft_tokens,
      scores=False,  # texts only: no log-softmax per token
    )
    tokens, lengths, stats = jax.device_get((result.tokens, result.lengths, result.stats))
    for row in range(rows):
      out = [int(t) for t in tokens[row, : lengths[row]] if t != model.config.eos_token_id]
      texts.append(vocabulary.decode(out))
    if stats is not None:
      totals += [int(np.sum(x[:rows])) for x in (stats.rounds, stats.drafted, stats.accepted)]
    progress.update(rows, note=_draft_progress(totals) if draft_plan is not None else "")
  if draft_plan is not None:
    texts.speculative = _draft_summary(totals)
  return texts


def _draft_summary(totals) -> dict:
  """``SpeculativeStats.as_dict()`` of host totals (exact ratios, no float32)."""
  rounds, drafted, accepted = (int(x) for x in totals)
  return {
    "rounds": rounds,
    "drafted": drafted,
    "accepted": accepted,
    "acceptance_rate": accepted / max(drafted, 1),
    "mean_accepted_length": accepted / max(rounds, 1),
  }


def _draft_progress(totals) -> str:
  s = _draft_summary(totals)
  return (
    f"draft acceptance rate {s['acceptance_rate']:.3f}, "
    f"{s['mean_accepted_length']:.2f} accepted per round"
  )
