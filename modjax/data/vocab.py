"""SentencePiece vocabularies: load one from a `.model` file, or train a small one locally.

Only `seqio.SentencePieceVocabulary` is used for tokenization: transformers' T5 tokenizers can
silently return a stub vocabulary offline (see DESIGN.md, "Pitfalls"). Always pass the size you
expect (32100 for T5's default model with 100 extra ids) so a wrong file fails loudly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import sentencepiece as spm

from modjax.data.errors import DataError
from modjax.data.tf_setup import seqio, tf

T5_PAD_ID, T5_EOS_ID, T5_UNK_ID, T5_BOS_ID = 0, 1, 2, -1
SENTENCEPIECE_SEED = 0


def load_vocabulary(
  path: str, extra_ids: int = 100, expected_size: int | None = None
) -> seqio.SentencePieceVocabulary:
  """Loads a SentencePiece model (local path or gs://) as a seqio vocabulary.

  Args:
    path: the `.model` file written by SentencePiece training.
    extra_ids: sentinel ids appended after the model's pieces (T5 uses 100).
    expected_size: if given, the vocabulary size including extra ids must equal it.

  Returns:
    The loaded vocabulary; `vocab.vocab_size` counts pieces plus extra ids.

  Raises:
    DataError: the file is missing, is not a SentencePiece model, or has an unexpected size.
  """
  path = os.fspath(path)
  if not tf.io.gfile.exists(path):
    raise DataError(
      f"vocabulary file {path} does not exist; pass the path of a SentencePiece .model file"
    )
  vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  try:
    size = vocabulary.vocab_size
  except Exception as error:  # sentencepiece raises RuntimeError/OSError/protobuf errors
    message = _one_line(error)
    raise DataError(
      f"vocabulary file {path} is not a SentencePiece model ({message}); pass a .model file"
    ) from error
  if expected_size is not None and size != expected_size:
    raise DataError(
      f"vocabulary {path} with extra_ids={extra_ids} has {size} ids but {expected_size} were "
      f"expected; pass the right .model file or fix expected_size/extra_ids"
    )
  return vocabulary


def train_sentencepiece(
  texts: Iterable[str], model_prefix: str, vocab_size: int, hard_vocab_limit: bool = True
) -> str:
  """Trains a small unigram SentencePiece model with T5's id conventions.

  pad=0, eos=1, unk=2 and no bos, as in T5's vocabulary; add extra ids when loading with
  `load_vocabulary`. Training is deterministic: texts are used in the given order (no sampling,
  no shuffling), one thread, and a fixed random seed.

  Args:
    texts: training sentences/documents, one string each (newlines inside are fine).
    model_prefix: output path without extension; `<model_prefix>.model` and `.vocab` are written.
    vocab_size: number of pieces including pad/eos/unk.
    hard_vocab_limit: if False, `vocab_size` is an upper bound: a corpus with few distinct words
      (such as `embedded_corpus_texts()`, which allows about 250) gets a smaller vocabulary instead
      of an error. Read the size from `load_vocabulary(path).vocab_size`.

  Returns:
    The path of the written `.model` file.

  Raises:
    DataError: no text was given, or the corpus is too small for `vocab_size`.
  """
  sentences = [text for text in texts if text and text.strip()]
  if not sentences:
    raise DataError("train_sentencepiece got no non-empty text; pass a corpus of sentences")
  directory = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(directory, exist_ok=True)
  spm.set_random_generator_seed(SENTENCEPIECE_SEED)
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type="unigram",
      pad_id=T5_PAD_ID,
      eos_id=T5_EOS_ID,
      unk_id=T5_UNK_ID,
      bos_id=T5_BOS_ID,
      character_coverage=1.0,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=1,
      hard_vocab_limit=hard_vocab_limit,
      minloglevel=2,
    )
  except RuntimeError as error:
    message = _one_line(error)
    limit = re.search(r"Vocabulary size too high .*<= ?(\d+)", message)
    if limit:
      raise DataError(
        f"vocab_size {vocab_size} is too large for this corpus (sentencepiece allows at most "
        f"{limit.group(1)}); pass vocab_size <= {limit.group(1)}, more text, or "
        "hard_vocab_limit=False"
      ) from error
    raise DataError(
      f"sentencepiece training failed for vocab_size={vocab_size} ({message}); check the corpus "
      "and vocab_size"
    ) from error
  return f"{model_prefix}.model"


def _one_line(error: BaseException) -> str:
  """The error's message squeezed onto one line."""
  return " ".join(str(error).split()) or type(error).__name__
