"""A Hugging Face GPT-2 directory with its own byte-level BPE tokenizer (``tokenizer.json``) goes
through ``python -m modjax.evaluate`` and ``python -m modjax.merge`` as it is, and the merged bank
through evaluation and recovery: the vocabulary is the tokenizer's (ids equal to
``transformers``'), found in the directory, and copied beside the merged bank.

Built here, no hub: a byte-level BPE trained with ``tokenizers`` on the embedded corpus (with
GPT-2's conventions: ``<|endoftext|>`` is the last id and the end of sequence) saved by
``PreTrainedTokenizerFast.save_pretrained``, beside a random-weight ``GPT2LMHeadModel``.
"""

import glob
import json
import os

import numpy as np
import pytest
import torch
from train_helpers import REPO, micro_config, micro_flags, run_cli_batch

from modjax.data import DataError, embedded_corpus_texts, load_vocabulary
from modjax.data.tf_setup import tf
from modjax.data.vocab import TokenizerVocabulary, find_vocabulary
from modjax.store import bank_io
from modjax.train import experiment
from modjax.train.scoring import make_eval_batches

EOS = "<|endoftext|>"
SETTINGS = dict(mesh__num_devices=1, eval__max_examples=8, eval__batch_size=4)
TEXTS = [
  "The council approved the new budget on Tuesday, 12 March.",
  "  Two spaces, a tab\tand naïve café déjà-vu (UTF-8) — fine?",
  "",
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  """A save_pretrained GPT-2 (4 layers, random weights) with its trained BPE tokenizer."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  directory = tmp_path_factory.mktemp("gpt2_bpe")
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
  bpe.train_from_iterator(embedded_corpus_texts(), trainer)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS
  )
  fast.save_pretrained(directory)
  eos = fast.convert_tokens_to_ids(EOS)
  assert eos == len(fast) - 1  # as in GPT-2: the last id
  torch.manual_seed(0)
  config = transformers.GPT2Config(
    vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=4, n_head=2,
    bos_token_id=eos, eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
  )  # fmt: skip
  transformers.GPT2LMHeadModel(config).save_pretrained(directory)
  return directory


def test_the_vocabulary_is_the_tokenizers_own(gpt2_dir, tmp_path):
  import transformers

  reference = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
  path = find_vocabulary(gpt2_dir)
  assert path == os.path.join(gpt2_dir, "tokenizer.json")
  vocabulary = load_vocabulary(path, extra_ids=0)
  assert isinstance(vocabulary, TokenizerVocabulary)
  assert load_vocabulary(str(gpt2_dir), extra_ids=0) == vocabulary
  assert vocabulary.vocab_size == len(reference) and vocabulary.eos_id == reference.eos_token_id
  for text in TEXTS:
    ids = reference(text, add_special_tokens=False)["input_ids"]
    assert vocabulary.encode(text) == ids
    assert vocabulary.encode_tf(tf.constant(text)).numpy().tolist() == ids
    assert vocabulary.decode(ids + [vocabulary.eos_id, 5, 6]) == reference.decode(ids)
    decoded = vocabulary.decode_tf(tf.constant(ids + [vocabulary.eos_id, 7]))
    assert decoded.numpy().decode() == reference.decode(ids)
  assert len(TEXTS[1]) > 20 and vocabulary.decode(vocabulary.encode(TEXTS[1])) == TEXTS[1]
  ragged = vocabulary.encode_tf(tf.constant(TEXTS[:2]))
  assert ragged.to_list() == [vocabulary.encode(t) for t in TEXTS[:2]]

  # the seqio pipeline's targets are the tokenizer's ids with the end of sequence appended
  cfg = micro_config(tmp_path, **SETTINGS)
  task = experiment.build_task(cfg, vocabulary)
  batch = make_eval_batches(task, "validation", feature_lengths={"targets": 64}, batch_size=2,
                            max_examples=2, model_type="lm")[0]  # fmt: skip
  examples = list(task.get_dataset(None, split="validation", shuffle=False).take(2))
  for row, example in enumerate(examples):
    ids = reference(example["targets_pretokenized"].numpy().decode())["input_ids"][:63]
    ids.append(vocabulary.eos_id)
    assert batch["decoder_target_tokens"][row][: len(ids)].tolist() == ids

  with pytest.raises(DataError, match="takes no extra ids"):
    load_vocabulary(path, extra_ids=100)
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(DataError, match="not a tokenizers JSON file"):
    load_vocabulary(str(tmp_path / "bad.json"), extra_ids=0)


def _flags(workdir, *args):
  return [*micro_flags(workdir, **SETTINGS), "--config.eval.metrics=perplexity", *args]


def _metrics(workdir) -> dict:
  (path,) = glob.glob(os.path.join(workdir, "eval", "*.metrics.json"))
  with open(path) as f:
    return json.load(f)


def _hf_cross_entropy(gpt2_dir, tmp_path) -> float:
  """Mean target-token cross-entropy of the PyTorch model on the same examples, tokenized by
  ``transformers``' own tokenizer."""
  import transformers

  reference = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
  model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).float().eval()
  task = experiment.build_task(micro_config(tmp_path, **SETTINGS), load_vocabulary(
    str(gpt2_dir), extra_ids=0))  # fmt: skip
  total, count = 0.0, 0
  for example in task.get_dataset(None, split="validation", shuffle=False).take(8):
    ids = reference(example["targets_pretokenized"].numpy().decode())["input_ids"]
    targets = ids[:15] + [reference.eos_token_id]  # seqio trims to targets_length 16 - 1
    inputs = torch.tensor([[0, *targets[:-1]]])  # seqio's autoregressive inputs start at 0
    with torch.no_grad():
      logits = model(input_ids=inputs).logits[0]
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="none")
    total, count = total + float(losses.sum()), count + len(targets)
  return total / count


def test_gpt2_directory_evaluates_merges_and_recovers_from_the_command_line(gpt2_dir, tmp_path):
  """Four ``python -m`` runs, in order, through one driver that imports modjax once
  (``train_helpers.run_cli_batch``): evaluate the directory, merge it, evaluate and recover the
  merged bank."""
  scored, merged = tmp_path / "scored_hf", tmp_path / "merged"
  scored_merged, recovered = tmp_path / "scored_merged", tmp_path / "recovered"
  merge = (f"--hf={gpt2_dir}", f"--out={merged}", "--k=2", "--calib-tokens=200")
  recovery = micro_flags(recovered, **SETTINGS, train__num_steps=2, checkpoint__every_steps=2)
  recovery[1] = f"{REPO}/configs/ffn_merge.py:tiny,{merged}"
  results = run_cli_batch(
    [
      ("evaluate_hf", "modjax.evaluate", _flags(scored, f"--hf={gpt2_dir}")),
      ("merge", "modjax.merge", [*micro_flags(tmp_path / "w", **SETTINGS), *merge]),
      # the merged bank's own copy of the tokenizer
      ("evaluate_merged", "modjax.evaluate", _flags(scored_merged, f"--bank={merged}")),
      ("recovery", "modjax.train", recovery),
    ],
    tmp_path,
  )
  result = results["evaluate_hf"]
  assert result.returncode == 0, result.stderr
  metrics = _metrics(scored)
  expected = _hf_cross_entropy(gpt2_dir, tmp_path)
  np.testing.assert_allclose(metrics["cross_entropy"], expected, rtol=1e-4)

  result = results["merge"]
  assert result.returncode == 0, result.stderr
  record = json.loads((merged / "merge.json").read_text())
  assert record["source_kind"] == "hf" and record["calibration_tokens"]["decoder"] >= 200
  copied = merged / "vocab" / "tokenizer.json"
  assert copied.read_bytes() == (gpt2_dir / "tokenizer.json").read_bytes()
  np.testing.assert_allclose(
    record["original"]["cross_entropy"], metrics["cross_entropy"], rtol=1e-5
  )
  stored = bank_io.load_bank(merged)
  start = record["start"]
  assert [s.ffn for s in stored.plan().decoder][start : start + 2] == [
    f"merged.{start}-{start + 2}"
  ] * 2

  result = results["evaluate_merged"]
  assert result.returncode == 0, result.stderr
  np.testing.assert_allclose(
    _metrics(scored_merged)["cross_entropy"],
    record["scores"][str(start)]["cross_entropy"],
    rtol=1e-5,
  )

  result = results["recovery"]
  assert result.returncode == 0, result.stderr
  assert bank_io.load_bank(recovered).step == 2
  assert not (recovered / "vocab" / "spm.model").exists()  # no new vocabulary was trained
