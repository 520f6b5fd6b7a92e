"""ROUGE and BLEU against hand-computed values and direct rouge-score / sacrebleu calls."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from modjax.core import metrics

PREDICTIONS = [
  "police arrested the suspect on friday .\nthe suspect was released on bail .",
  "the storm flooded several towns in the north",
  "Officials said the bridge will reopen next week.",
]
REFERENCES = [
  "the suspect was released on bail .\npolice arrested the suspect on friday night .",
  "several northern towns were flooded by the storm",
  "The bridge will reopen next week, officials said.",
]


def test_identical_texts_score_100():
  texts = [
    "the quick brown fox jumps over the lazy dog",
    "first sentence here .\nand a second one .",
  ]
  assert metrics.rouge(texts, texts) == pytest.approx(dict.fromkeys(metrics.ROUGE_TYPES, 100.0))
  assert metrics.bleu(texts, texts)["bleu"] == pytest.approx(100.0)


def test_rouge_hand_computed():
  # 3 of 6 reference unigrams recalled with precision 1: F = 2 * 1 * 0.5 / 1.5.
  result = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
  assert result["rouge1"] == pytest.approx(200 / 3)
  # bigrams: 2 of 5 reference bigrams, precision 2/2: F = 2 * 1 * 0.4 / 1.4.
  assert result["rouge2"] == pytest.approx(100 * 0.8 / 1.4)


def test_rouge_lsum_splits_sentences_on_newlines_only():
  # Swapped sentences: one LCS over the whole text matches only one sentence, the summary-level
  # LCS matches each reference sentence fully.
  reference = "alpha beta gamma\ndelta epsilon zeta"
  swapped = "delta epsilon zeta\nalpha beta gamma"
  result = metrics.rouge([swapped], [reference])
  assert result["rougeL"] == pytest.approx(50.0)
  assert result["rougeLsum"] == pytest.approx(100.0)
  # Without newlines each text is one sentence, so rougeLsum equals rougeL.
  flat = metrics.rouge([swapped.replace("\n", " ")], [reference.replace("\n", " ")])
  assert flat["rougeLsum"] == pytest.approx(flat["rougeL"]) == pytest.approx(50.0)


def test_rouge_matches_rouge_score_mean_of_fmeasures():
  scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=True)
  per_example = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES, strict=True)]
  expected = {
    rouge_type: 100 * sum(s[rouge_type].fmeasure for s in per_example) / len(per_example)
    for rouge_type in metrics.ROUGE_TYPES
  }
  result = metrics.rouge(PREDICTIONS, REFERENCES)
  assert result == pytest.approx(expected)
  assert result["rougeLsum"] > result["rougeL"] + 10  # the multi-sentence example
  assert 0 < result["rouge2"] < result["rouge1"] < 100


def test_rouge_uses_stemming():
  result = metrics.rouge(["the towns flooded"], ["the town floods"])
  assert result["rouge1"] == pytest.approx(100.0)


def test_bleu_matches_sacrebleu_corpus_bleu():
  result = metrics.bleu(PREDICTIONS, REFERENCES)
  expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES])
  assert result["bleu"] == pytest.approx(expected.score)
  assert 0 < result["bleu"] < 100
  assert "tok:13a" in result["bleu_signature"]


def test_bleu_13a_and_intl_tokenizers_differ_on_unicode_punctuation():
  predictions = ["The cat sat on the mat — “really”.", "He said: ‘no’… twice."]
  references = ["The cat sat on the mat — “ really ” .", "He said : ‘ no ’ … twice ."]
  with_13a = metrics.bleu(predictions, references)
  with_intl = metrics.bleu(predictions, references, tokenize="intl")
  # intl splits the curly quotes and ellipsis off the words, 13a only splits ASCII punctuation.
  assert with_intl["bleu"] == pytest.approx(100.0)
  assert with_13a["bleu"] < 60
  assert "tok:intl" in with_intl["bleu_signature"]
  expected = sacrebleu.corpus_bleu(predictions, [references], tokenize="intl").score
  assert with_intl["bleu"] == pytest.approx(expected)


def test_score_dispatches_by_name():
  result = metrics.score(["rouge", "bleu"], PREDICTIONS, REFERENCES)
  assert set(result) == {*metrics.ROUGE_TYPES, "bleu", "bleu_signature"}
  assert result["rougeLsum"] == pytest.approx(metrics.rouge(PREDICTIONS, REFERENCES)["rougeLsum"])
  assert metrics.score("bleu", PREDICTIONS, REFERENCES) == metrics.bleu(PREDICTIONS, REFERENCES)


def test_bad_input_is_a_one_line_value_error():
  with pytest.raises(ValueError, match=r"unknown metric\(s\) \['meteor'\].*\['bleu', 'rouge'\]"):
    metrics.score(["rouge", "meteor"], PREDICTIONS, REFERENCES)
  with pytest.raises(ValueError, match="3 predictions but 2 references") as error:
    metrics.rouge(PREDICTIONS, REFERENCES[:2])
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="3 predictions but 1 references"):
    metrics.bleu(PREDICTIONS, REFERENCES[:1])
  with pytest.raises(ValueError, match="not a str"):
    metrics.rouge("a text", "a text")
  with pytest.raises(ValueError, match="no predictions"):
    metrics.bleu([], [])
