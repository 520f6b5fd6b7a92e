"""Tests of the data layer: vocabularies, file sources, seqio tasks and the batching pipeline.

Everything runs offline: the vocabulary is trained here on the embedded corpus, user files are
written into tmp dirs, and the TFDS tasks read `tfds.testing.mock_data` (random text generated
from each builder's feature spec; xsum's manual download is skipped by the mock too).
"""

import gzip
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from modjax import data
from modjax.data import embedded

# The corpora live in shared/ beside the checkout (../shared/data from the repository root).
DDTP_VALIDATION = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "shared",
  "data",
  "ddtp-summ",
  "validation.jsonl.gz",
)
LENGTHS = {"inputs": 48, "targets": 16}
PACKING_LENGTHS = {"inputs": 256, "targets": 64}  # embedded_lead: ~100 + ~30 tokens per example
ENCDEC_KEYS = {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens"}
ENCDEC_KEYS |= {"decoder_loss_weights"}
ENCDEC_PACKING_KEYS = {"encoder_segment_ids", "encoder_positions"}
ENCDEC_PACKING_KEYS |= {"decoder_segment_ids", "decoder_positions"}


@pytest.fixture(scope="module")
def sp_model_path(tmp_path_factory):
  texts = data.embedded_corpus_texts()[:1500]
  return data.train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm") / "spm"), 200)


@pytest.fixture(scope="module")
def vocab(sp_model_path):
  return data.load_vocabulary(sp_model_path, extra_ids=10)


def write_jsonl(path, records, compress=False):
  lines = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in records)
  opener = gzip.open if compress else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(lines)
  return str(path)


def numbered_records(count, start=0):
  return [
    {"id": i, "inputs": f"The town mayor opened exhibit {i} today.", "targets": f"exhibit {i}"}
    for i in range(start, start + count)
  ]


@pytest.fixture(scope="module")
def numbered_task(vocab, tmp_path_factory):
  """A jsonl task of 24 distinct short examples (one per batch row when unpacked)."""
  directory = tmp_path_factory.mktemp("numbered")
  train = write_jsonl(directory / "train.jsonl", numbered_records(24))
  return data.get_task("jsonl", vocab, files={"train": train})


def rows(batches, key="decoder_target_tokens"):
  return [tuple(row) for batch in batches for row in batch[key]]


def assert_one_line_error(error_info, *fragments):
  message = str(error_info.value)
  assert "\n" not in message
  for fragment in fragments:
    assert str(fragment) in message, message


# ---------------------------------------------------------------------------------- vocabulary


def test_vocabulary_has_t5_ids_and_checks_its_size(sp_model_path, vocab):
  assert vocab.vocab_size == 200 + 10
  tokenizer = vocab.tokenizer
  assert (tokenizer.pad_id(), tokenizer.eos_id(), tokenizer.unk_id(), tokenizer.bos_id()) == (
    0,
    1,
    2,
    -1,
  )
  assert data.load_vocabulary(sp_model_path, extra_ids=10, expected_size=210).vocab_size == 210
  with pytest.raises(data.DataError) as error:
    data.load_vocabulary(sp_model_path, extra_ids=10, expected_size=32100)
  assert_one_line_error(error, "210", "32100")


def test_load_vocabulary_rejects_missing_and_invalid_files(tmp_path):
  with pytest.raises(data.DataError) as error:
    data.load_vocabulary(str(tmp_path / "absent.model"))
  assert_one_line_error(error, "absent.model", "does not exist")
  bogus = tmp_path / "bogus.model"
  bogus.write_text("not a model")
  with pytest.raises(data.DataError) as error:
    data.load_vocabulary(str(bogus))
  assert_one_line_error(error, "bogus.model", "not a SentencePiece model")


def test_train_sentencepiece_is_deterministic_and_explains_small_corpora(sp_model_path, tmp_path):
  texts = data.embedded_corpus_texts()[:1500]
  again = data.train_sentencepiece(texts, str(tmp_path / "again"), 200)
  first, second = (
    data.load_vocabulary(path, extra_ids=0).tokenizer for path in (sp_model_path, again)
  )
  pieces = [(first.id_to_piece(i), first.get_score(i)) for i in range(first.get_piece_size())]
  assert pieces == [(second.id_to_piece(i), second.get_score(i)) for i in range(200)]
  with pytest.raises(data.DataError) as error:
    data.train_sentencepiece(texts[:50], str(tmp_path / "big"), 5000)
  assert_one_line_error(error, "5000", "hard_vocab_limit=False")


# ------------------------------------------------------------------------------ file sources


def test_jsonl_gz_and_tsv_tasks_read_files_in_order(vocab, tmp_path):
  records = numbered_records(5)
  train = write_jsonl(tmp_path / "train.jsonl.gz", records, compress=True)
  validation = write_jsonl(tmp_path / "validation.jsonl", records[:2])
  task = data.get_task(
    "jsonl", vocab, files={"train": train, "validation": validation}, inputs_prefix="summarize: "
  )
  assert (
    data.get_task(
      "jsonl", vocab, files={"train": train, "validation": validation}, inputs_prefix="summarize: "
    )
    is task
  )  # idempotent registration
  examples = data.make_eval_examples(task, "train")
  assert [e["inputs"] for e in examples] == ["summarize: " + r["inputs"] for r in records]
  assert [e["targets"] for e in examples] == [r["targets"] for r in records]
  for example in examples:
    assert example["targets_ids"].dtype == np.int32 and example["targets_ids"][-1] == 1  # EOS
    assert vocab.decode(example["targets_ids"].tolist()) == example["targets"]
  assert len(data.make_eval_examples(task, "validation")) == 2

  tsv = tmp_path / "train.tsv"
  tsv.write_text("".join(f"{r['inputs']}\t{r['targets']}\n" for r in records) + "\n")
  tsv_task = data.get_task("tsv", vocab, files={"train": str(tsv)})
  tsv_examples = data.make_eval_examples(tsv_task, "train", max_examples=3)
  assert [(e["inputs"], e["targets"]) for e in tsv_examples] == [
    (r["inputs"], r["targets"]) for r in records[:3]
  ]


def test_jsonl_custom_fields_and_globs(vocab, tmp_path):
  for shard in range(2):
    write_jsonl(
      tmp_path / f"part-{shard}.jsonl",
      [{"doc": f"document {shard}{i}", "summary": f"s{shard}{i}"} for i in range(2)],
    )
  source = data.jsonl_source(
    {"train": str(tmp_path / "part-*.jsonl")}, inputs_field="doc", targets_field="summary"
  )
  assert source.examples("train") == (
    ("document 00", "s00"),
    ("document 01", "s01"),
    ("document 10", "s10"),
    ("document 11", "s11"),
  )


BAD_JSONL_CASES = {
  "empty": (["", "  "], "has no examples"),
  "bad_json": ([json.dumps({"inputs": "a", "targets": "b"}), "{not json"], "line 2 is not valid"),
  "missing_field": ([json.dumps({"inputs": "a", "summary": "b"})], "no field 'targets'"),
  "not_a_string": ([json.dumps({"inputs": "a", "targets": 3})], "is a int, not a string"),
  "not_an_object": (["[1, 2]"], "is a JSON list"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL_CASES))
def test_bad_jsonl_raises_one_line_data_error(vocab, tmp_path, case):
  lines, expected = BAD_JSONL_CASES[case]
  path = write_jsonl(tmp_path / f"{case}.jsonl.gz", lines, compress=True)
  task = data.get_task("jsonl", vocab, files={"train": path})
  with pytest.raises(data.DataError) as error:
    data.make_eval_examples(task, "train")
  assert_one_line_error(error, path, expected)


def test_bad_tsv_and_missing_files_raise_one_line_data_errors(vocab, tmp_path):
  tsv = tmp_path / "bad.tsv"
  tsv.write_text("a\tb\nonly one column\n")
  with pytest.raises(data.DataError) as error:
    data.tsv_source({"train": str(tsv)}).examples("train")
  assert_one_line_error(error, "bad.tsv", "line 2", "has 1 tab-separated columns, expected 2")
  with pytest.raises(data.DataError) as error:
    data.get_task("jsonl", vocab, files={"train": str(tmp_path / "nowhere-*.jsonl")})
  assert_one_line_error(error, "nowhere-*.jsonl", "'train'", "check the path")


def test_bad_task_and_pipeline_arguments_raise_one_line_data_errors(vocab, numbered_task):
  with pytest.raises(data.DataError) as error:
    data.get_task("cnn_dm", vocab)
  assert_one_line_error(error, "cnn_dm", "cnn_dailymail", "embedded_lead", "jsonl")
  with pytest.raises(data.DataError) as error:
    data.get_task("jsonl", vocab)
  assert_one_line_error(error, "files=")
  with pytest.raises(data.DataError) as error:
    data.get_task("xsum", vocab, files={"train": "x.jsonl"})
  assert_one_line_error(error, "takes no files")
  bad_calls = {
    "not divisible by process_count 3": dict(batch_size=4, process_count=3),
    "process_index 2": dict(process_index=2, process_count=2),
    "unknown model_type": dict(model_type="seq2seq"),
    "feature_lengths": dict(feature_lengths={"inputs": 8}),
    "no split 'test'": dict(split="test"),
  }
  for expected, overrides in bad_calls.items():
    kwargs = dict(split="train", feature_lengths=LENGTHS, batch_size=4, pack=False, seed=0)
    kwargs.update(overrides)
    with pytest.raises(data.DataError) as error:
      next(data.make_batches(numbered_task, **kwargs))
    assert_one_line_error(error, expected)


# ---------------------------------------------------------------------------- TFDS tasks


@pytest.mark.parametrize("name", sorted(data.TFDS_TASKS))
def test_tfds_task_through_the_pipeline(vocab, name):
  """The pinned TFDS builders are known offline; mock_data fills them with random text."""
  with tfds.testing.mock_data(num_examples=8):
    task = data.get_task(name, vocab)
    batches = list(
      data.make_batches(
        task, "train", feature_lengths=LENGTHS, batch_size=4, pack=False, seed=0, num_epochs=1
      )
    )
    examples = data.make_eval_examples(task, "validation", max_examples=2)
  assert len(batches) == 2
  assert set(batches[0]) == ENCDEC_KEYS
  assert batches[0]["encoder_input_tokens"].shape == (4, LENGTHS["inputs"])
  assert batches[0]["decoder_target_tokens"].shape == (4, LENGTHS["targets"])
  assert len(examples) == 2
  prefix = {"squad_question_generation": "generate question: answer: "}.get(name)
  prefix = prefix or data.TFDS_TASKS[name].default_prefix
  assert examples[0]["inputs"].startswith(prefix)
  if name == "squad_question_generation":
    assert " context: " in examples[0]["inputs"]


# -------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
  "model_type,lengths,pack,expected_keys,expected_length",
  [
    ("encdec", LENGTHS, False, ENCDEC_KEYS, None),
    ("encdec", PACKING_LENGTHS, True, ENCDEC_KEYS | ENCDEC_PACKING_KEYS, None),
    ("lm", {"targets": 96}, True, {"decoder_input_tokens", "decoder_target_tokens"}, 96),
    ("lm", LENGTHS, False, {"decoder_causal_attention", "decoder_input_tokens"}, 64),
  ],
)
def test_padding_and_packing_keys_and_shapes(
  vocab, model_type, lengths, pack, expected_keys, expected_length
):
  task = data.get_task("embedded_lead", vocab)
  batches = data.make_batches(
    task,
    "train",
    feature_lengths=lengths,
    batch_size=6,
    pack=pack,
    seed=0,
    model_type=model_type,
    process_index=1,
    process_count=2,
  )
  batch = next(batches)
  assert expected_keys <= set(batch)
  if model_type == "encdec":
    assert set(batch) == expected_keys
  elif pack:
    assert {"decoder_segment_ids", "decoder_positions"} <= set(batch)
  for key, array in batch.items():
    assert array.dtype == np.int32
    length = expected_length or (
      lengths["inputs"] if key.startswith("encoder") else lengths["targets"]
    )
    assert array.shape == (3, length) == batches.batch_shapes[key]
  if pack:  # several examples share a row
    segment_key = "encoder_segment_ids" if model_type == "encdec" else "decoder_segment_ids"
    assert batch[segment_key].max() >= 2
  assert batches.position == 1


def test_seed_fixes_the_order_across_epochs(numbered_task):
  def first_batches(seed, count=9):
    batches = data.make_batches(
      numbered_task, "train", feature_lengths=LENGTHS, batch_size=8, pack=False, seed=seed
    )
    return rows(itertools.islice(batches, count))

  order = first_batches(seed=1)
  assert order == first_batches(seed=1)
  assert order != first_batches(seed=2)
  epochs = [order[i : i + 24] for i in range(0, 72, 24)]  # 3 batches of 8 = one epoch of 24
  assert all(sorted(epoch) == sorted(epochs[0]) and len(set(epoch)) == 24 for epoch in epochs)
  assert epochs[0] != epochs[1]  # reshuffled each epoch, still deterministic


def test_resume_from_position_continues_exactly(vocab):
  task = data.get_task("embedded_lead", vocab)
  kwargs = dict(feature_lengths=LENGTHS, batch_size=4, pack=True, seed=3)
  batches = data.make_batches(task, "train", **kwargs)
  head = [next(batches) for _ in range(5)]
  assert len(head) == 5 and batches.position == 5
  expected = [next(batches) for _ in range(3)]
  resumed = data.make_batches(task, "train", start_batch=5, **kwargs)
  assert resumed.position == 5
  for want in expected:
    got = next(resumed)
    assert all(np.array_equal(got[key], want[key]) for key in want)
  assert resumed.position == 8


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_read_disjoint_shards_that_cover_the_split(numbered_task, shuffle):
  def epoch_rows(batch_size, process_index=0, process_count=1):
    batches = data.make_batches(
      numbered_task,
      "train",
      feature_lengths=LENGTHS,
      batch_size=batch_size,
      pack=False,
      seed=5,
      shuffle=shuffle,
      num_epochs=1,
      process_index=process_index,
      process_count=process_count,
    )
    return rows(batches)

  everything = epoch_rows(4)
  first, second = epoch_rows(4, 0, 2), epoch_rows(4, 1, 2)
  assert len(everything) == 24 and len(first) == len(second) == 12
  assert not set(first) & set(second)
  assert set(first) | set(second) == set(everything)


# --------------------------------------------------------------------------- embedded_lead


def test_embedded_lead_is_deterministic_lead_one_summarization(vocab):
  train = embedded.embedded_lead_examples("train")
  assert len(train) == embedded.EMBEDDED_SPLIT_SIZES["train"]
  assert len(set(train)) > 0.95 * len(train)
  for article, summary in train[:50]:
    assert article.startswith(summary + " ") and summary.endswith(".")
    assert 3 <= article.count(". ") + 1 <= 4
  embedded.embedded_lead_examples.cache_clear()
  assert embedded.embedded_lead_examples("train") == train
  assert not set(train) & set(embedded.embedded_lead_examples("validation"))

  task = data.get_task("embedded_lead", vocab)
  examples = data.make_eval_examples(task, "validation", max_examples=3)
  articles = embedded.embedded_lead_examples("validation")[:3]
  assert [e["inputs"] for e in examples] == ["summarize: " + a for a, _ in articles]
  assert [e["targets"] for e in examples] == [s for _, s in articles]


# ------------------------------------------------------------------------------ real files


@pytest.mark.skipif(not os.path.exists(DDTP_VALIDATION), reason=f"{DDTP_VALIDATION} not present")
def test_ddtp_validation_file_loads(vocab, tmp_path):
  with gzip.open(DDTP_VALIDATION, "rt", encoding="utf-8") as f:
    first_lines = list(itertools.islice(f, 200))
  path = write_jsonl(tmp_path / "ddtp.jsonl.gz", [line.rstrip("\n") for line in first_lines], True)
  task = data.get_task("jsonl", vocab, files={"validation": path}, inputs_prefix="summarize: ")
  examples = data.make_eval_examples(task, "validation")
  records = [json.loads(line) for line in first_lines]
  assert [e["targets"] for e in examples] == [r["targets"] for r in records]
  assert examples[0]["inputs"] == "summarize: " + records[0]["inputs"]
  batch = next(
    data.make_batches(task, "validation", feature_lengths=LENGTHS, batch_size=8, pack=True, seed=0)
  )
  assert batch["encoder_input_tokens"].shape == (8, LENGTHS["inputs"])
