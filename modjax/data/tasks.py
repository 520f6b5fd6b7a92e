"""seqio Tasks for the standard data sets, the user's own files and the embedded synthetic task.

`get_task(name, vocabulary, ...)` registers a task once (idempotently) under a registry name that
includes a hash of everything that defines it, and returns it. Every task yields string fields
`inputs`/`targets`, tokenizes them with the caller's vocabulary (keeping `inputs_pretokenized` and
`targets_pretokenized` for evaluation), and appends EOS after trimming.

| name | source | inputs -> targets |
| --- | --- | --- |
| cnn_dailymail | TFDS cnn_dailymail:3.4.0 | "summarize: " + article -> highlights (newline-joined, kept for rougeLsum) |
| xsum | TFDS xsum:1.1.0 (manual download) | "summarize: " + document -> summary |
| squad_question_generation | TFDS squad/v1.1:3.0.0 | "generate question: answer: {first answer} context: {context}" -> question |
| wmt14_ende | TFDS wmt14_translate/de-en:1.0.0 | "translate English to German: " + en -> de |
| jsonl / tsv | the user's files (`files=`) | [inputs_prefix] + inputs -> targets |
| embedded_lead | generated in memory, no download | "summarize: " + article -> first sentence |

xsum needs a manual download: TFDS cannot fetch XSum itself. Run the EdinburghNLP/XSum download and
extraction scripts (XSum-Dataset/README.md), put `xsum-extracts-from-downloads.tar.gz` in
`<tfds_data_dir>/downloads/manual/` (or build once with `tfds build xsum --manual_dir=DIR`), and
pass `tfds_data_dir=`; until then reading xsum fails with TFDS's manual-download error.

TFDS sources are `PinnedTfdsSource`s: seqio's TFDS source, except that a data set whose split
metadata is not available yet (not prepared; or mocked in tests) reports an unknown size and one
shard instead of failing before TFDS gets the chance to prepare it; multi-process reading then
shards by example.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping

from modjax.data import embedded, sources
from modjax.data.errors import DataError
from modjax.data.tf_setup import seqio, tf

SUMMARIZE_PREFIX = embedded.SUMMARIZE_PREFIX


@dataclasses.dataclass(frozen=True)
class TfdsTaskSpec:
  """A standard task: a pinned TFDS data set and how one of its examples becomes inputs/targets."""

  tfds_name: str
  splits: tuple[str, ...]
  default_prefix: str
  format_example: Callable[[Mapping[str, tf.Tensor], str], dict[str, tf.Tensor]]
  keep_example: Callable[[Mapping[str, tf.Tensor]], tf.Tensor] | None = None


def _summarize(document_key: str, summary_key: str):
  def format_example(example, prefix):
    return {
      "inputs": tf.strings.join([prefix, example[document_key]]),
      "targets": example[summary_key],
    }

  return format_example


def _squad_question_generation(example, prefix):
  first_answer = example["answers"]["text"][0]
  inputs = tf.strings.join([prefix, "answer: ", first_answer, " context: ", example["context"]])
  return {"inputs": inputs, "targets": example["question"]}


def _squad_has_answer(example) -> tf.Tensor:
  return tf.size(example["answers"]["text"]) > 0


def _english_to_german(example, prefix):
  return {"inputs": tf.strings.join([prefix, example["en"]]), "targets": example["de"]}


TFDS_TASKS: dict[str, TfdsTaskSpec] = {
  "cnn_dailymail": TfdsTaskSpec(
    "cnn_dailymail:3.4.0",
    ("train", "validation", "test"),
    SUMMARIZE_PREFIX,
    _summarize("article", "highlights"),
  ),
  "xsum": TfdsTaskSpec(
    "xsum:1.1.0",
    ("train", "validation", "test"),
    SUMMARIZE_PREFIX,
    _summarize("document", "summary"),
  ),
  "squad_question_generation": TfdsTaskSpec(
    "squad/v1.1:3.0.0",
    ("train", "validation"),
    "generate question: ",
    _squad_question_generation,
    keep_example=_squad_has_answer,  # SQuAD v1.1 always has one; guards against empty lists
  ),
  "wmt14_ende": TfdsTaskSpec(
    "wmt14_translate/de-en:1.0.0",
    ("train", "validation", "test"),
    "translate English to German: ",
    _english_to_german,
  ),
}
FILE_TASKS = ("jsonl", "tsv")
EMBEDDED_TASKS = ("embedded_lead",)
KNOWN_TASKS = (*TFDS_TASKS, *FILE_TASKS, *EMBEDDED_TASKS)


def get_task(
  name: str,
  vocabulary: seqio.Vocabulary,
  *,
  files: sources.FileSpec | None = None,
  inputs_prefix: str | None = None,
  inputs_field: str = "inputs",
  targets_field: str = "targets",
  tfds_data_dir: str | None = None,
  shuffle_buffer_size: int | None = None,
) -> seqio.Task:
  """Registers (once) and returns the seqio Task `name` tokenized with `vocabulary`.

  Args:
    name: one of `KNOWN_TASKS`.
    vocabulary: used for both "inputs" and "targets" (EOS appended to both).
    files: jsonl/tsv only: mapping split -> path, glob, or list of them.
    inputs_prefix: text put before the inputs. None: the task's standard prefix (none for files).
      For squad_question_generation it replaces "generate question: ".
    inputs_field, targets_field: jsonl only: the JSON fields holding the texts.
    tfds_data_dir: TFDS data directory (None: TFDS's default); for xsum it holds the manual files.
    shuffle_buffer_size: TFDS tasks: the Task's shuffle buffer (None: seqio's default; in-memory
      sources shuffle fully).

  Returns:
    The registered `seqio.Task`; the same object for the same arguments.

  Raises:
    DataError: unknown name, `files` given or missing where it must not/must be, or bad files.
  """
  _check_task_args(name, files)
  if shuffle_buffer_size is None:
    shuffle_buffer_size = seqio.SHUFFLE_BUFFER_SIZE
  fields = [inputs_field, targets_field]
  digest = _task_digest(name, vocabulary, files, inputs_prefix, fields, tfds_data_dir,
                        shuffle_buffer_size)  # fmt: skip
  registry_name = f"modjax.{name}.{digest}"
  if registry_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(registry_name)
  if name in TFDS_TASKS:
    source, format_fn = _tfds_source(name, inputs_prefix, tfds_data_dir)
    buffer_size: int | None = shuffle_buffer_size
  else:
    source, format_fn = _own_source(name, files, inputs_prefix, inputs_field, targets_field)
    buffer_size = None  # the in-memory source shuffles the whole split itself
  output_features = {
    "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }
  return seqio.TaskRegistry.add(
    registry_name,
    source=source,
    preprocessors=[
      format_fn,
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=output_features,
    shuffle_buffer_size=buffer_size,
  )


def _task_digest(name, vocabulary, files, inputs_prefix, fields, tfds_data_dir, buffer) -> str:
  """A short hash of everything that makes a registered task what it is."""
  spec = {
    "name": name,
    "vocabulary": _vocabulary_fingerprint(vocabulary),
    "files": _files_fingerprint(files),
    "inputs_prefix": inputs_prefix,
    "fields": fields if name == "jsonl" else None,
    "tfds_data_dir": tfds_data_dir,
    "shuffle_buffer_size": buffer if name in TFDS_TASKS else None,
  }
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _check_task_args(name: str, files) -> None:
  if name not in KNOWN_TASKS:
    raise DataError(f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}")
  if name in FILE_TASKS and not files:
    raise DataError(f"task {name!r} reads your files; pass files={{'train': path, ...}}")
  if name not in FILE_TASKS and files:
    raise DataError(f"task {name!r} takes no files; use name='jsonl' or 'tsv' for your own files")


def _tfds_source(name: str, inputs_prefix, tfds_data_dir):
  """(source, formatting preprocessor) of a TFDS task."""
  from modjax.data.seqio_sources import PinnedTfdsSource

  task_spec = TFDS_TASKS[name]
  prefix = task_spec.default_prefix if inputs_prefix is None else inputs_prefix
  source = PinnedTfdsSource(
    tfds_name=task_spec.tfds_name, tfds_data_dir=tfds_data_dir, splits=task_spec.splits
  )
  format_fn = functools.partial(
    _format_dataset,
    format_example=task_spec.format_example,
    prefix=prefix,
    keep=task_spec.keep_example,
  )
  return source, format_fn


def _own_source(name: str, files, inputs_prefix, inputs_field, targets_field):
  """(source, formatting preprocessor) of the embedded task or the user's jsonl/tsv files."""
  if name == "embedded_lead":
    source = embedded_lead_source()
    prefix = SUMMARIZE_PREFIX if inputs_prefix is None else inputs_prefix
  elif name == "jsonl":
    source = sources.jsonl_source(files, inputs_field=inputs_field, targets_field=targets_field)
    prefix = inputs_prefix or ""
  else:
    source = sources.tsv_source(files)
    prefix = inputs_prefix or ""
  return source, functools.partial(_prefix_inputs, prefix=prefix)


def embedded_lead_source() -> sources.InMemoryPairSource:
  """The in-memory source of `embedded_lead` (raw article/lead pairs, no prefix)."""
  from modjax.data.seqio_sources import InMemoryPairSource

  return InMemoryPairSource(
    embedded.embedded_lead_examples, splits=tuple(embedded.EMBEDDED_SPLIT_SIZES)
  )


def embedded_corpus_texts() -> list[str]:
  """Texts to train a SentencePiece vocabulary for `embedded_lead` (see `train_sentencepiece`)."""
  return embedded.embedded_corpus_texts()


def _format_dataset(dataset, format_example, prefix, keep=None):
  """Maps TFDS examples to {"inputs", "targets"} strings, dropping those `keep` rejects."""
  if keep is not None:
    dataset = dataset.filter(keep)
  return dataset.map(
    lambda example: format_example(example, prefix), num_parallel_calls=tf.data.AUTOTUNE
  )


def _prefix_inputs(dataset, prefix: str):
  """Puts `prefix` before the inputs text of {"inputs", "targets"} examples."""
  if not prefix:
    return dataset
  return dataset.map(
    lambda example: {
      "inputs": tf.strings.join([prefix, example["inputs"]]),
      "targets": example["targets"],
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )


def _vocabulary_fingerprint(vocabulary: seqio.Vocabulary) -> list:
  """Identifies a vocabulary by its model file, extra ids and model contents."""
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    contents = hashlib.sha256(vocabulary.sp_model).hexdigest()
    return [vocabulary.sentencepiece_model_file, vocabulary.extra_ids, contents]
  if not isinstance(vocabulary, seqio.Vocabulary):
    raise DataError(
      f"vocabulary is a {type(vocabulary).__name__}, not a seqio.Vocabulary; "
      "load one with modjax.data.load_vocabulary"
    )
  return [type(vocabulary).__name__, vocabulary.extra_ids, repr(vocabulary)]


def _files_fingerprint(files: sources.FileSpec | None) -> dict | None:
  if not files:
    return None
  return {split: sources.as_patterns(split, spec) for split, spec in sorted(files.items())}


def __getattr__(name: str):
  """``PinnedTfdsSource`` (in ``seqio_sources``) loads with TensorFlow on first use."""
  if name == "PinnedTfdsSource":
    from modjax.data import seqio_sources

    return seqio_sources.PinnedTfdsSource
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
