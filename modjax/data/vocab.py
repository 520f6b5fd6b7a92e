"""Vocabularies: SentencePiece (load a `.model` file, or train a small one locally) and a Hugging
Face `tokenizer.json` (GPT-2's byte-level BPE, or any `tokenizers` model), both as seqio
vocabularies so the seqio pipeline is the same for either.

T5 tokenizes with `seqio.SentencePieceVocabulary`: transformers' T5 tokenizers can silently return
a stub vocabulary offline (see DESIGN.md, "Pitfalls"). Always pass the size you expect (32100 for
T5's default model with 100 extra ids) so a wrong file fails loudly. A `tokenizer.json` is read
by the `tokenizers` library itself (`TokenizerVocabulary`), the same code `transformers` runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

from modjax.data.errors import DataError
from modjax.data.tf_setup import seqio, tf

T5_PAD_ID, T5_EOS_ID, T5_UNK_ID, T5_BOS_ID = 0, 1, 2, -1
SENTENCEPIECE_SEED = 0


def load_vocabulary(
  path: str, extra_ids: int = 100, expected_size: int | None = None
) -> seqio.Vocabulary:
  """Loads a SentencePiece model or a Hugging Face ``tokenizer.json`` (local path or gs://) as a
  seqio vocabulary.

  Args:
    path: the `.model` file written by SentencePiece training; or a `tokenizer.json` (a path
      ending in `.json`, or a directory holding one, such as a `save_pretrained` directory).
    extra_ids: sentinel ids appended after the model's pieces (T5 uses 100; a `tokenizer.json`
      takes none).
    expected_size: if given, the vocabulary size including extra ids must equal it.

  Returns:
    The loaded vocabulary; `vocab.vocab_size` counts pieces plus extra ids.

  Raises:
    DataError: the file is missing, is not a vocabulary, or has an unexpected size.
  """
  path = os.fspath(path)
  if not tf.io.gfile.exists(path):
    raise DataError(
      f"vocabulary file {path} does not exist; pass a SentencePiece .model file or a "
      "Hugging Face tokenizer.json"
    )
  if path.endswith(".json") or tf.io.gfile.isdir(path):
    vocabulary = _load_tokenizer_json(path, extra_ids)
    _check_size(vocabulary, path, extra_ids, expected_size)
    return vocabulary
  vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  try:
    _ = vocabulary.vocab_size  # loads the model: a file that is not one fails here
  except Exception as error:  # sentencepiece raises RuntimeError/OSError/protobuf errors
    message = _one_line(error)
    raise DataError(
      f"vocabulary file {path} is not a SentencePiece model ({message}); pass a .model file"
    ) from error
  _check_size(vocabulary, path, extra_ids, expected_size)
  return vocabulary


def _check_size(vocabulary, path: str, extra_ids: int, expected_size: int | None) -> None:
  size = vocabulary.vocab_size
  if expected_size is not None and size != expected_size:
    raise DataError(
      f"vocabulary {path} with extra_ids={extra_ids} has {size} ids but {expected_size} were "
      f"expected; pass the right vocabulary file or fix expected_size/extra_ids"
    )


# Where a directory keeps its vocabulary, in the order they are looked for: a bank's or workdir's
# trained SentencePiece model, a bank's copied tokenizer.json, a save_pretrained directory's own.
VOCABULARY_FILES = ("vocab/spm.model", "vocab/tokenizer.json", "tokenizer.json")


def find_vocabulary(directory) -> str | None:
  """The first of :data:`VOCABULARY_FILES` under ``directory`` that exists, else None."""
  for name in VOCABULARY_FILES:
    path = os.path.join(os.fspath(directory), name)
    if tf.io.gfile.exists(path):
      return path
  return None


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


# ---- Hugging Face tokenizer.json ---------------------------------------------------------------

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")  # when no tokenizer_config.json names one


class TokenizerVocabulary(seqio.Vocabulary):
  """A ``tokenizers`` model (``tokenizer.json``) as a seqio vocabulary: ids are the tokenizer's
  own (GPT-2's byte-level BPE: the 50,257 ids its embeddings were trained on), encoded without
  special tokens (seqio appends the end-of-sequence id itself).

  The end-of-sequence token is ``eos_token``, else the ``eos_token`` of a
  ``tokenizer_config.json`` beside the file, else the first of :data:`EOS_CANDIDATES` the
  vocabulary has. seqio pads with id 0 and weights every non-zero target: with GPT-2's vocabulary
  id 0 is the token ``!``, so a ``!`` in a target counts as padding (no loss weight, not in FFN
  calibration features), as it does in every seqio pipeline over such a vocabulary.
  """

  def __init__(self, path: str, eos_token: str | None = None):
    super().__init__(extra_ids=0)
    import tokenizers  # a dependency of transformers

    self._path = os.fspath(path)
    with tf.io.gfile.GFile(self._path, "rb") as f:
      data = f.read()
    self._sha256 = hashlib.sha256(data).hexdigest()
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # tokenizers raises its own Exception subclass
      raise DataError(
        f"vocabulary file {self._path} is not a tokenizers JSON file ({_one_line(error)}); "
        "pass the tokenizer.json that save_pretrained wrote"
      ) from error
    self._size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self._eos = self._find_eos(eos_token)
    unk = getattr(self._tokenizer.model, "unk_token", None)
    self._unk = self._tokenizer.token_to_id(unk) if unk else None

  def _find_eos(self, eos_token: str | None) -> int:
    config = os.path.join(os.path.dirname(self._path), "tokenizer_config.json")
    if eos_token is None and tf.io.gfile.exists(config):
      with tf.io.gfile.GFile(config) as f:
        eos_token = json.load(f).get("eos_token")
      eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    for token in candidates:
      if self._tokenizer.token_to_id(token) is not None:
        return self._tokenizer.token_to_id(token)
    raise DataError(
      f"{self._path} has no end-of-sequence token {list(candidates)}; save the tokenizer with "
      "its eos_token (tokenizer_config.json beside it)"
    )

  @property
  def tokenizer_file(self) -> str:
    return self._path

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return self._size

  def _encode(self, s: str) -> list[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    """Text of ``ids`` up to the first end-of-sequence id (ids outside the vocabulary and
    special tokens left out)."""
    ids = [int(i) for i in ids]
    if self._eos in ids:
      ids = ids[: ids.index(self._eos)]
    return self._tokenizer.decode([i for i in ids if 0 <= i < self._size], skip_special_tokens=True)

  def _encode_tf(self, s):
    """A scalar string to int32 ids [L]; a vector of strings to a RaggedTensor [B, None]."""
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank == 0:
      ids = tf.py_function(lambda t: np.asarray(self._encode(_text(t)), np.int32), [s], tf.int32)
      ids.set_shape([None])
      return ids
    if s.shape.rank == 1:
      values, lengths = tf.py_function(self._encode_rows, [s], (tf.int32, tf.int64))
      return tf.RaggedTensor.from_row_lengths(values, lengths)
    raise DataError(f"encode_tf takes a string or a vector of strings, got rank {s.shape.rank}")

  def _encode_rows(self, strings):
    rows = [self._encode(_text(t)) for t in strings]
    values = np.asarray([i for row in rows for i in row], np.int32)
    return values, np.asarray([len(row) for row in rows], np.int64)

  def _decode_tf(self, ids):
    """Int ids [L] to a scalar string; [B, L] to a vector of strings."""
    ids = tf.convert_to_tensor(ids)
    if ids.shape.rank not in (1, 2):
      raise DataError(f"decode_tf takes ids of rank 1 or 2, got rank {ids.shape.rank}")

    def decode(values):
      values = values.numpy()
      if values.ndim == 1:
        return np.asarray(self._decode(values).encode("utf-8"), dtype=object)
      return np.asarray([self._decode(row).encode("utf-8") for row in values], dtype=object)

    out = tf.py_function(decode, [ids], tf.string)
    out.set_shape(ids.shape[:-1])
    return out

  def __eq__(self, other) -> bool:
    return (
      isinstance(other, TokenizerVocabulary)
      and (self._sha256, self._eos) == (other._sha256, other._eos)  # noqa: SLF001
    )

  def __hash__(self) -> int:
    return hash((self._sha256, self._eos))

  def __repr__(self) -> str:
    return f"TokenizerVocabulary(path={self._path!r}, sha256={self._sha256}, eos_id={self._eos})"


def _text(tensor) -> str:
  return tensor.numpy().decode("utf-8")


def _load_tokenizer_json(path: str, extra_ids: int) -> TokenizerVocabulary:
  """The tokenizer.json at ``path`` (or inside the directory ``path``)."""
  if tf.io.gfile.isdir(path):
    inside = os.path.join(path, "tokenizer.json")
    if not tf.io.gfile.exists(inside):
      raise DataError(
        f"vocabulary directory {path} holds no tokenizer.json; pass a .model or tokenizer.json"
      )
    path = inside
  if extra_ids:
    raise DataError(
      f"a tokenizer.json vocabulary ({path}) takes no extra ids, got extra_ids={extra_ids}; "
      "set --config.data.extra_ids=0"
    )
  return TokenizerVocabulary(path)
