"""A small T5 (6+6 layers) trained from scratch on DDTP English -> German (package descriptions
and their German translations, ../shared/data/ddtp-ende): the encoder-decoder original that FFN
merging compresses (configs/ffn_merge.py). BLEU is sacrebleu's corpus BLEU, tokenizer 13a. The arg
is the corpus folder, optionally followed by ``,converged``: trained until its validation loss
improves by less than 1% over about an epoch (750 steps of 16).

  python -m modjax.train --config configs/ddtp_ende.py:../shared/data/ddtp-ende \\
      --config.workdir=runs/ddtp_ende
  python -m modjax.evaluate --config configs/ddtp_ende.py:../shared/data/ddtp-ende \\
      --config.workdir=runs/ddtp_ende
  python -m modjax.train --config configs/ddtp_ende.py:../shared/data/ddtp-ende,converged \\
      --config.workdir=runs/ddtp_ende_converged
"""

from modjax.train.defaults import base_config, converge, jsonl_corpus, lock


def get_config(arg: str = "../shared/data/ddtp-ende"):
  data_dir, _, mode = (arg or "../shared/data/ddtp-ende").partition(",")
  c = jsonl_corpus(base_config(), data_dir)
  c.model.preset = "small-cpu-6"
  c.data.inputs_prefix = "translate English to German: "
  c.data.vocab_size = 6000  # one SentencePiece model over both languages
  c.data.inputs_length = 128  # median ~55 English words
  c.data.targets_length = 128
  c.train.batch_size = 16
  c.train.num_steps = 600  # ~0.8 epoch of 11,739 pairs; ~16 min alone on 2 CPU cores
  c.train.log_every = 25
  c.optimizer.name = "adafactor"
  c.optimizer.learning_rate = 0.01
  c.optimizer.schedule = "rsqrt"
  c.optimizer.warmup_steps = 100
  c.checkpoint.every_steps = 100
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 128
  c.eval.metrics = "bleu"
  if mode == "converged":
    converge(c, cap=30_000, every=250, window=750)  # 11,739 pairs / 16 per batch
  elif mode:
    raise ValueError(f"unknown mode {mode!r}; use '<data dir>' or '<data dir>,converged'")
  return lock(c)
