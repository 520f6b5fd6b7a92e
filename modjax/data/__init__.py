"""The data layer: vocabularies, data sources, seqio tasks and deterministic, resumable batches.

    vocab = load_vocabulary("spm.model", extra_ids=100, expected_size=32100)
    task = get_task("cnn_dailymail", vocab)
    batches = make_batches(task, "train", feature_lengths={"inputs": 512, "targets": 128},
                           batch_size=64, pack=True, seed=0)
    batch = next(batches)  # int32 numpy arrays; batches.position goes into the checkpoint

TensorFlow is used for the input pipeline only, imported on first use, and never sees a GPU (see
`tf_setup`): importing this package does not import it.
"""

from modjax.data.embedded import embedded_corpus_texts
from modjax.data.errors import DataError
from modjax.data.pipeline import (
  BatchIterator,
  local_batch_size_for,
  make_batched_dataset,
  make_batches,
  make_eval_examples,
)
from modjax.data.sources import jsonl_source, tsv_source
from modjax.data.tasks import KNOWN_TASKS, TFDS_TASKS, get_task
from modjax.data.vocab import load_vocabulary, train_sentencepiece

__all__ = [
  "KNOWN_TASKS",
  "TFDS_TASKS",
  "BatchIterator",
  "DataError",
  "InMemoryPairSource",
  "TextFileSource",
  "embedded_corpus_texts",
  "get_task",
  "jsonl_source",
  "load_vocabulary",
  "local_batch_size_for",
  "make_batched_dataset",
  "make_batches",
  "make_eval_examples",
  "train_sentencepiece",
  "tsv_source",
]


def __getattr__(name: str):
  """The seqio source classes load with TensorFlow on first use (see ``seqio_sources``)."""
  if name in ("InMemoryPairSource", "TextFileSource"):
    from modjax.data import seqio_sources

    return getattr(seqio_sources, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
