"""From a seqio Task to fixed-shape numpy batches for training, and raw examples for evaluation.

`make_batches` runs `task.get_dataset` (tokenize, trim, append EOS, shuffle from the seed, repeat),
seqio's feature converter (padding or packing), then batches this process's rows. Batch keys are
seqio's names:

* encdec: encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights;
  packed also encoder_segment_ids, encoder_positions, decoder_segment_ids, decoder_positions.
* lm with feature_lengths {"targets"}: decoder_input_tokens, decoder_target_tokens,
  decoder_loss_weights (+ decoder_segment_ids, decoder_positions when packed).
* lm with feature_lengths {"inputs", "targets"}: seqio's prefix-LM, which concatenates inputs and
  targets into one sequence of length inputs+targets, puts loss on the targets only, and adds
  decoder_causal_attention (1 over the prefix).

All arrays are int32 with fixed shapes [batch_size // process_count, length]; the last partial
batch is dropped.

Determinism and resumption: with `options.deterministic = True` and every shuffle seeded, the same
arguments give the same batches in every run and on every process, across epoch boundaries too
(seqio repeats before its seeded shuffle; in-memory sources reshuffle each epoch from the seed).
The iterator counts the batches it has yielded in `.position` (starting at `start_batch`); store it
in the checkpoint and pass it back as `start_batch` to get exactly the batches that would have
followed. Resuming uses tf.data `skip` on the batched dataset: the skipped batches are still
produced (read, tokenized, packed) inside tf.data, but never copied to Python, so resuming costs
about as much input-pipeline time as producing them did (usually far less than the model steps).

Multiple processes: each reads a disjoint shard (in-memory sources and unsharded TFDS splits by
example, TFDS splits with at least process_count files by file, as seqio decides), so shards may
differ in size. With num_epochs=None (training) that never matters; with a finite num_epochs the
processes can run out after different numbers of batches, so evaluate with `make_eval_examples`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from modjax.data.errors import DataError
from modjax.data.tf_setup import seqio, tf

MODEL_TYPES = ("encdec", "lm")


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Iterates numpy batches and knows its position in the batch sequence.

  `position` is the number of batches yielded so far plus the `start_batch` it began at: the value
  to pass as `start_batch` to resume right after the last batch that was used.
  """

  def __init__(self, dataset: tf.data.Dataset, start_batch: int):
    self.dataset = dataset
    self.position = start_batch
    self._numpy_batches = dataset.as_numpy_iterator()

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._numpy_batches)
    self.position += 1
    return {key: np.asarray(value, dtype=np.int32) for key, value in batch.items()}

  @property
  def batch_shapes(self) -> dict[str, tuple[int, ...]]:
    """The fixed shape of every batch array, by key."""
    return {key: tuple(spec.shape) for key, spec in self.dataset.element_spec.items()}


def make_batches(
  task: seqio.Task | str,
  split: str,
  *,
  feature_lengths: Mapping[str, int],
  batch_size: int,
  pack: bool,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  start_batch: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  model_type: str = "encdec",
) -> BatchIterator:
  """This process's batches of `task`'s `split`, as int32 numpy dicts (see the module docstring).

  Args:
    task: a seqio Task (e.g. from `get_task`) or the name of a registered one.
    split: e.g. "train" or "validation".
    feature_lengths: maximum token lengths, {"inputs": n, "targets": m} (lm: "targets" alone for a
      plain language model).
    batch_size: the GLOBAL batch size; each process yields batch_size // process_count rows.
    pack: pack several examples per row (adds segment ids and positions) instead of padding.
    seed: seeds every shuffle; the same seed gives the same batch sequence.
    shuffle: shuffle examples (False: file order, e.g. for evaluation).
    num_epochs: passes over the data; None repeats forever.
    start_batch: batches to skip, e.g. a checkpoint's stored `position`.
    process_index, process_count: this process and the number of data-loading processes
      (`jax.process_index()`, `jax.process_count()`); each reads a disjoint shard.
    model_type: "encdec" (seqio.EncDecFeatureConverter) or "lm" (seqio.DecoderFeatureConverter).

  Returns:
    A `BatchIterator` whose `.position` starts at `start_batch`.

  Raises:
    DataError: on a bad argument (indivisible batch size, unknown model type, missing lengths...).
  """
  dataset = make_batched_dataset(
    task,
    split,
    feature_lengths=feature_lengths,
    batch_size=batch_size,
    pack=pack,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    start_batch=start_batch,
    process_index=process_index,
    process_count=process_count,
    model_type=model_type,
  )
  return BatchIterator(dataset, start_batch)


def make_batched_dataset(
  task: seqio.Task | str,
  split: str,
  *,
  feature_lengths: Mapping[str, int],
  batch_size: int,
  pack: bool,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  start_batch: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  model_type: str = "encdec",
) -> tf.data.Dataset:
  """The tf.data pipeline behind `make_batches` (same arguments), already batched and skipped."""
  local_batch_size = local_batch_size_for(batch_size, process_index, process_count)
  lengths = _checked_feature_lengths(feature_lengths, model_type)
  if not isinstance(seed, int | np.integer):
    raise DataError(f"seed must be an int, got {seed!r}; pass a fixed integer seed")
  if num_epochs is not None and num_epochs < 1:
    raise DataError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}")
  if start_batch < 0:
    raise DataError(f"start_batch must be >= 0, got {start_batch}; pass a stored position")
  task = _resolve_task(task)
  _check_split(task, split)
  shard_info = seqio.ShardInfo(process_index, process_count) if process_count > 1 else None
  dataset = task.get_dataset(
    sequence_length=lengths,
    split=split,
    shuffle=shuffle,
    seed=int(seed),
    shard_info=shard_info,
    num_epochs=num_epochs,
  )
  if model_type == "encdec":
    converter = seqio.EncDecFeatureConverter(pack=pack)
  else:
    converter = seqio.DecoderFeatureConverter(pack=pack)
  dataset = converter(dataset, lengths)
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  if start_batch:
    dataset = dataset.skip(start_batch)
  return _deterministic(dataset.prefetch(tf.data.AUTOTUNE))


def local_batch_size_for(batch_size: int, process_index: int, process_count: int) -> int:
  """Rows per process for a global `batch_size`; DataError if it does not divide evenly."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(
      f"process_index {process_index} with process_count {process_count} is invalid; "
      "pass 0 <= process_index < process_count"
    )
  if batch_size < 1:
    raise DataError(f"batch_size must be >= 1, got {batch_size}")
  if batch_size % process_count:
    raise DataError(
      f"global batch_size {batch_size} is not divisible by process_count {process_count}; "
      f"use a multiple of {process_count}"
    )
  return batch_size // process_count


def make_eval_examples(
  task: seqio.Task | str,
  split: str,
  max_examples: int | None = None,
  feature_lengths: Mapping[str, int] | None = None,
) -> list[dict]:
  """The first `max_examples` examples of `split` in file order, for evaluation and decoding.

  Each dict has "inputs" and "targets" (the untokenized texts, from seqio's `*_pretokenized`
  fields, task prefix included in "inputs") and "inputs_ids"/"targets_ids" (int32 token ids ending
  in EOS; trimmed to `feature_lengths` if given, else complete).
  """
  if max_examples is not None and max_examples < 0:
    raise DataError(f"max_examples must be None or >= 0, got {max_examples}")
  task = _resolve_task(task)
  _check_split(task, split)
  dataset = task.get_dataset(
    sequence_length=dict(feature_lengths) if feature_lengths else None,
    split=split,
    shuffle=False,
    seed=None,
    num_epochs=1,
  )
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  examples = []
  for example in _deterministic(dataset).as_numpy_iterator():
    examples.append(
      {
        "inputs": example["inputs_pretokenized"].decode("utf-8"),
        "targets": example["targets_pretokenized"].decode("utf-8"),
        "inputs_ids": np.asarray(example["inputs"], dtype=np.int32),
        "targets_ids": np.asarray(example["targets"], dtype=np.int32),
      }
    )
  return examples


def _deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def _resolve_task(task: seqio.Task | str) -> seqio.Task:
  if isinstance(task, seqio.Task):
    return task
  if isinstance(task, str) and task in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(task)
  raise DataError(
    f"{task!r} is not a seqio Task or a registered task name; create one with get_task(...)"
  )


def _check_split(task: seqio.Task, split: str) -> None:
  splits = list(task.splits)
  if splits and split not in splits:
    raise DataError(f"task {task.name} has no split {split!r}; use one of {splits}")


def _checked_feature_lengths(feature_lengths: Mapping[str, int], model_type: str) -> dict:
  if model_type not in MODEL_TYPES:
    raise DataError(f"unknown model_type {model_type!r}; use one of {list(MODEL_TYPES)}")
  lengths = dict(feature_lengths or {})
  required = {"inputs", "targets"} if model_type == "encdec" else {"targets"}
  allowed = {"inputs", "targets"}
  if not required <= set(lengths) or not set(lengths) <= allowed:
    raise DataError(
      f"feature_lengths {lengths} must have keys {sorted(required)} (optional for lm: 'inputs'); "
      "pass e.g. {'inputs': 512, 'targets': 128}"
    )
  for key, length in lengths.items():
    if not isinstance(length, int | np.integer) or length < 1:
      raise DataError(f"feature_lengths[{key!r}] must be a positive int, got {length!r}")
  return {key: int(length) for key, length in lengths.items()}
