"""seqio data sources for in-memory text pairs: the user's own JSONL/TSV files and embedded data.
The reading and validation are here; the `seqio.DataSource` classes themselves
(`InMemoryPairSource`, `TextFileSource`) are in `seqio_sources`, loaded with TensorFlow on first
use (`jsonl_source`, `tsv_source`, or the names from this module).

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

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from modjax.data.errors import DataError
from modjax.data.tf_setup import tf

if TYPE_CHECKING:
  from modjax.data.seqio_sources import TextFileSource

TextPair = tuple[str, str]
FileSpec = Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]


def jsonl_source(
  files: FileSpec, inputs_field: str = "inputs", targets_field: str = "targets"
) -> TextFileSource:
  """A source over JSONL(.gz) files, one JSON object per line with the two string fields."""
  from modjax.data.seqio_sources import TextFileSource

  return TextFileSource(files, "jsonl", inputs_field=inputs_field, targets_field=targets_field)


def tsv_source(files: FileSpec) -> TextFileSource:
  """A source over TSV(.gz) files, two tab-separated columns (inputs, targets) per line."""
  from modjax.data.seqio_sources import TextFileSource

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


def __getattr__(name: str):
  """The seqio source classes (``seqio_sources``) load with TensorFlow on first use."""
  if name in ("InMemoryPairSource", "TextFileSource"):
    from modjax.data import seqio_sources

    return getattr(seqio_sources, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
