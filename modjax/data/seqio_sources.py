"""The seqio ``DataSource`` subclasses of the data layer, apart because defining them imports seqio
(and so TensorFlow): ``sources`` and ``tasks`` import this module only when a source is built.

* ``InMemoryPairSource`` / ``TextFileSource``: (inputs, targets) pairs held in memory, from the
  user's JSONL/TSV files or the embedded data (see ``modjax.data.sources`` for the formats,
  sharding and shuffling).
* ``PinnedTfdsSource``: seqio's TFDS source, tolerant of missing split metadata (see
  ``modjax.data.tasks``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from modjax.data.errors import DataError
from modjax.data.sources import (
  _READERS,
  FileSpec,
  TextPair,
  _files_signature,
  as_patterns,
  resolve_files,
)
from modjax.data.tf_setup import load

_modules = load()
seqio, tf = _modules["seqio"], _modules["tensorflow"]


class InMemoryPairSource(seqio.DataSource):
  """A `seqio.DataSource` over (inputs, targets) string pairs held in memory.

  Yields `{"inputs": tf.string, "targets": tf.string}`. Supports arbitrary sharding by example
  and performs its own full shuffle, so tasks over it need no shuffle buffer.
  """

  def __init__(self, load_split: Callable[[str], Sequence[TextPair]], splits: Sequence[str]):
    """Args: load_split reads one split's pairs (called once per split); splits names them."""
    super().__init__(splits=splits, performs_internal_shuffling=True)
    self._load_split = load_split
    self._loaded: dict[str, tuple[TextPair, ...]] = {}

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def num_input_examples(self, split: str) -> int | None:
    """Deliberately None: a known small size makes seqio cache the source, which would freeze the
    first epoch's shuffle order for every later epoch. Use `count_examples` for the size."""
    return None

  def count_examples(self, split: str) -> int:
    """Number of examples in `split` (loads and validates it)."""
    return len(self.examples(split))

  def examples(self, split: str) -> tuple[TextPair, ...]:
    """All (inputs, targets) pairs of `split` in file order, loaded and validated once."""
    self._check_split(split)
    if split not in self._loaded:
      self._loaded[split] = tuple(self._load_split(split))
    return self._loaded[split]

  def _check_split(self, split: str) -> None:
    if split not in self.splits:
      raise DataError(f"this data source has no split {split!r}; use one of {list(self.splits)}")

  def get_dataset(
    self,
    split: str = "train",
    shuffle: bool = True,
    seed: int | None = None,
    shard_info: seqio.ShardInfo | None = None,
    *,
    sequence_length: Mapping[str, int] | None = None,  # unused, part of seqio's interface
    use_cached: bool = False,  # unused
    num_epochs: int | None = 1,  # unused: seqio's Task repeats
  ) -> tf.data.Dataset:
    """The split's examples (one shard of them), optionally shuffled from `seed`."""
    pairs = self.examples(split)
    if shard_info is not None:
      if not 0 <= shard_info.index < shard_info.num_shards:
        raise DataError(
          f"shard index {shard_info.index} is outside 0..{shard_info.num_shards - 1}; "
          "pass 0 <= index < num_shards"
        )
      pairs = pairs[shard_info.index :: shard_info.num_shards]
    inputs = [inputs_text for inputs_text, _ in pairs]
    targets = [targets_text for _, targets_text in pairs]
    dataset = tf.data.Dataset.from_tensor_slices(
      {
        "inputs": tf.constant(inputs, dtype=tf.string, shape=[len(inputs)]),
        "targets": tf.constant(targets, dtype=tf.string, shape=[len(targets)]),
      }
    )
    if shuffle and len(pairs) > 1:
      dataset = dataset.shuffle(len(pairs), seed=seed, reshuffle_each_iteration=True)
    return dataset


class TextFileSource(InMemoryPairSource):
  """Examples from the user's JSONL or TSV files, given as a mapping split -> path(s)/glob(s).

  Paths may be local or anything `tf.io.gfile` reads (gs://). A split whose pattern matches
  several files reads them in sorted order. Patterns are checked at construction (missing files
  fail at once); file contents are validated when a split is first used.
  """

  def __init__(
    self,
    files: FileSpec,
    file_format: str,
    inputs_field: str = "inputs",
    targets_field: str = "targets",
  ):
    if file_format not in _READERS:
      raise DataError(f"unknown file format {file_format!r}; use one of {sorted(_READERS)}")
    if not files:
      raise DataError("no data files given; pass files={'train': path, 'validation': path}")
    self.file_format = file_format
    self.inputs_field = inputs_field
    self.targets_field = targets_field
    self._file_signatures: dict[str, tuple] = {}
    self.patterns = {split: as_patterns(split, spec) for split, spec in files.items()}
    for split in self.patterns:
      resolve_files(split, self.patterns[split])
    super().__init__(load_split=self._read_split, splits=tuple(self.patterns))

  def examples(self, split: str) -> tuple[TextPair, ...]:
    """Like the parent, but re-reads a split whose files changed since it was loaded."""
    self._check_split(split)
    signature = _files_signature(resolve_files(split, self.patterns[split]))
    if self._file_signatures.get(split) != signature:
      self._loaded.pop(split, None)
      self._file_signatures[split] = signature
    return super().examples(split)

  def _read_split(self, split: str) -> list[TextPair]:
    pairs: list[TextPair] = []
    for path in resolve_files(split, self.patterns[split]):
      pairs.extend(_READERS[self.file_format](path, self.inputs_field, self.targets_field))
    return pairs

  def __repr__(self) -> str:
    return f"TextFileSource({self.file_format}, {self.patterns})"


class PinnedTfdsSource(seqio.TfdsDataSource):
  """`seqio.TfdsDataSource` that tolerates missing split metadata (see the module docstring)."""

  def num_input_examples(self, split: str) -> int | None:
    try:
      return super().num_input_examples(split)
    except KeyError:  # tfds: "splits is empty", the data set is not prepared (or is mocked)
      return None

  def list_shards(self, split: str) -> list[str]:
    try:
      return list(super().list_shards(split))
    except KeyError:
      return [split]

  def get_dataset(self, split: str | None = None, *args, **kwargs) -> tf.data.Dataset:
    """seqio's TFDS read; a missing manual download becomes a one-line DataError."""
    try:
      return super().get_dataset(split, *args, **kwargs)
    except AssertionError as error:
      if "Manual directory" not in str(error):
        raise
      first_line = str(error).strip().splitlines()[0]
      raise DataError(
        f"TFDS {self.tfds_dataset.name} needs a manual download ({first_line}); download it as "
        "described in modjax.data.tasks and pass tfds_data_dir="
      ) from error
