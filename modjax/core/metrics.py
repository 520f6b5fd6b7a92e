"""Text-generation metrics: ROUGE (`rouge-score`) and BLEU (`sacrebleu`), with their conventions.

ROUGE conventions:
  - F-measures, averaged over examples (a plain mean, not rouge-score's bootstrap aggregate),
    scaled to 0..100; Porter stemming on (`use_stemmer=True`); rouge-score's default tokenizer
    (lower-cases, keeps only ASCII letters and digits).
  - `rougeLsum` is the summary-level LCS over sentences split on newlines ("\\n"). A text without
    newlines is ONE sentence; there is no automatic sentence splitting (nltk's splitter would need
    a data download). Join reference and predicted sentences with "\\n" before scoring, as TFDS
    `cnn_dailymail` highlights already are. On multi-sentence summaries `rougeL` and `rougeLsum`
    differ a lot (papers' "~40 R-L" on CNN/DailyMail is rougeLsum): always report which.

BLEU conventions:
  - sacrebleu corpus BLEU on detokenised text, one reference per prediction, default options
    except `tokenize`. The default tokenizer here is sacrebleu's default `13a`; T5's own evaluation
    used `intl` (which also splits Unicode punctuation and symbols), so pass `tokenize="intl"` to
    compare with T5 numbers. The returned signature names the tokenizer: report it with the score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check_pairs(metric: str, predictions: Sequence[str], references: Sequence[str]) -> None:
  if isinstance(predictions, str) or isinstance(references, str):
    raise ValueError(f"{metric}: predictions and references must be lists of strings, not a str.")
  if len(predictions) != len(references):
    raise ValueError(
      f"{metric}: got {len(predictions)} predictions but {len(references)} references; "
      "pass one reference per prediction."
    )
  if not predictions:
    raise ValueError(f"{metric}: no predictions to score; pass at least one example.")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE F-measures x100: {"rouge1", "rouge2", "rougeL", "rougeLsum"}.

  Sentences for rougeLsum are the newline-separated lines of each text (see the module docstring).
  """
  _check_pairs("rouge", predictions, references)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for prediction, reference in zip(predictions, references, strict=True):
    scores = scorer.score(target=reference, prediction=prediction)
    for rouge_type in ROUGE_TYPES:
      totals[rouge_type] += scores[rouge_type].fmeasure
  return {rouge_type: 100.0 * total / len(predictions) for rouge_type, total in totals.items()}


def bleu(
  predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a"
) -> dict[str, float | str]:
  """sacrebleu corpus BLEU on detokenised text: {"bleu": score 0..100, "bleu_signature": str}.

  `tokenize` is any sacrebleu tokenizer name; "13a" is sacrebleu's default, T5 used "intl".
  """
  _check_pairs("bleu", predictions, references)
  metric = sacrebleu.metrics.BLEU(tokenize=tokenize)
  result = metric.corpus_score(list(predictions), [list(references)])
  return {"bleu": float(result.score), "bleu_signature": str(metric.get_signature())}


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], dict]] = {
  "rouge": rouge,
  "bleu": bleu,
}


def score(
  metric_names: str | Sequence[str], predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float | str]:
  """Runs each named metric (see `METRICS`) and merges their result dicts."""
  names = [metric_names] if isinstance(metric_names, str) else list(metric_names)
  unknown = [name for name in names if name not in METRICS]
  if unknown:
    raise ValueError(f"unknown metric(s) {unknown}; known metrics are {sorted(METRICS)}.")
  results: dict[str, float | str] = {}
  for name in names:
    results.update(METRICS[name](predictions, references))
  return results
