"""seqio data sources for in-memory text pairs: the user's own JSONL/TSV files and embedded data.

A split is read, validated and held in memory on first use (the DDTP summaries, ~48k examples,
load in well under a second), so every malformed line is reported before any tf.data pipeline
runs, with the file and line number. Each source then

* shards by example: process `i` of `n` reads examples `i, i+n, i+2n, ...` of the split (in file
  order), so shards are disjoint, balanced, and together cover the split;
* shuffles a whole shard at once (not a buffer) when asked, from the given seed, and reshuffles
  each epoch deterministically when the dataset is repeated.

Formats (one example per line, blank lines skipped, `.gz` files are decompressed):

* JSONL: a JSON object per line with string fields `inputs` and `targets` (names configurable);
  other fields such as `id` are ignored.
* TSV: exactly two tab-separated columns, inputs then targets, taken literally (no header, no
  escapes). Use JSONL for text that contains tabs or newlines.
"""

import gzip
import json
import os
from collections.abc import Callable, Mapping, Sequence

import seqio

from modjax.data.errors import DataError
from modjax.data.tf_setup import tf

TextPair = tuple[str, str]
FileSpec = Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]


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


def jsonl_source(
  files: FileSpec, inputs_field: str = "inputs", targets_field: str = "targets"
) -> TextFileSource:
  """A source over JSONL(.gz) files, one JSON object per line with the two string fields."""
  return TextFileSource(files, "jsonl", inputs_field=inputs_field, targets_field=targets_field)


def tsv_source(files: FileSpec) -> TextFileSource:
  """A source over TSV(.gz) files, two tab-separated columns (inputs, targets) per line."""
  return TextFileSource(files, "tsv")


def resolve_files(split: str, patterns: Sequence[str]) -> list[str]:
  """Expands the split's paths/globs to a sorted list of existing files; DataError if none."""
  paths: list[str] = []
  for pattern in patterns:
    matches = sorted(tf.io.gfile.glob(pattern))
    if not matches:
      raise DataError(
        f"no data file matches {pattern!r} for split {split!r}; check the path "
        "(globs such as data/train-*.jsonl are allowed)"
      )
    paths.extend(matches)
  return paths


def as_patterns(split: str, spec) -> list[str]:
  """One split's file spec (a path, glob, or a list of them) as a list of strings."""
  if isinstance(spec, str | os.PathLike):
    spec = [spec]
  patterns = [os.fspath(item) for item in spec]
  if not patterns or not all(patterns):
    raise DataError(f"split {split!r} has no file path; pass a path or glob for it")
  return patterns


def _files_signature(paths: Sequence[str]) -> tuple:
  stats = [tf.io.gfile.stat(path) for path in paths]
  return tuple(
    (path, stat.length, stat.mtime_nsec) for path, stat in zip(paths, stats, strict=True)
  )


def _read_lines(path: str):
  """Yields (line number, text) for the non-blank lines of a (possibly gzipped) file."""
  with tf.io.gfile.GFile(path, "rb") as raw:
    stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
    try:
      for number, line_bytes in enumerate(stream, start=1):
        try:
          line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as error:
          raise DataError(
            f"data file {path} line {number} is not valid UTF-8 ({error}); re-encode the file as "
            "UTF-8"
          ) from error
        line = line.rstrip("\r\n")
        if line.strip():
          yield number, line
    except (OSError, EOFError) as error:
      message = " ".join(str(error).split())
      raise DataError(
        f"data file {path} cannot be read ({message}); check that it is intact (.gz: not truncated)"
      ) from error


def _read_jsonl(path: str, inputs_field: str, targets_field: str) -> list[TextPair]:
  pairs = []
  for number, line in _read_lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise DataError(
        f"data file {path} line {number} is not valid JSON: {error}; fix or remove that line"
      ) from error
    if not isinstance(record, dict):
      raise DataError(
        f"data file {path} line {number} is a JSON {type(record).__name__}, not an object; "
        f"write one object per line with fields {inputs_field!r} and {targets_field!r}"
      )
    pairs.append(
      (
        _string_field(record, inputs_field, path, number),
        _string_field(record, targets_field, path, number),
      )
    )
  if not pairs:
    raise DataError(f"data file {path} has no examples; fill it or remove it from the file list")
  return pairs


def _string_field(record: dict, field: str, path: str, number: int) -> str:
  if field not in record:
    raise DataError(
      f"data file {path} line {number} has no field {field!r} (it has {sorted(record)}); add it "
      "or pass inputs_field=/targets_field= naming the fields the file uses"
    )
  value = record[field]
  if not isinstance(value, str):
    raise DataError(
      f"data file {path} line {number} field {field!r} is a {type(value).__name__}, not a "
      "string; store the text as a JSON string"
    )
  return value


def _read_tsv(path: str, inputs_field: str, targets_field: str) -> list[TextPair]:
  del inputs_field, targets_field  # TSV columns are positional: inputs, then targets.
  pairs = []
  for number, line in _read_lines(path):
    columns = line.split("\t")
    if len(columns) != 2:
      raise DataError(
        f"data file {path} line {number} has {len(columns)} tab-separated columns, expected 2 "
        "(inputs<TAB>targets); fix that line or use JSONL for text containing tabs"
      )
    pairs.append((columns[0], columns[1]))
  if not pairs:
    raise DataError(f"data file {path} has no examples; fill it or remove it from the file list")
  return pairs


_READERS = {"jsonl": _read_jsonl, "tsv": _read_tsv}
