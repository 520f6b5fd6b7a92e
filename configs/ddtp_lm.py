"""A small GPT-2-shaped language model trained on the English package descriptions of
DDTP-summ (the JSON field ``inputs``): the decoder-only original that FFN merging compresses
(configs/ffn_merge.py). The arg is the corpus folder, optionally followed by ``,converged``:
trained until its validation loss improves by less than 1% over about an epoch (3,000 steps of
16; 900 steps is ~0.3 epoch), the original that the equal-parameter comparison needs.

  python -m modjax.train --config configs/ddtp_lm.py:../shared/data/ddtp-summ \\
      --config.workdir=runs/ddtp_lm
  python -m modjax.evaluate --config configs/ddtp_lm.py:../shared/data/ddtp-summ \\
      --config.workdir=runs/ddtp_lm
  python -m modjax.train --config configs/ddtp_lm.py:../shared/data/ddtp-summ,converged \\
      --config.workdir=runs/ddtp_lm_converged
"""

from modjax.train.defaults import base_config, converge, jsonl_corpus, lock


def get_config(arg: str = "../shared/data/ddtp-summ"):
  data_dir, _, mode = (arg or "../shared/data/ddtp-summ").partition(",")
  c = jsonl_corpus(base_config(), data_dir)
  c.model.preset = "gpt2-small-cpu"
  c.data.targets_field = "inputs"  # the LM models the descriptions themselves
  c.data.vocab_size = 4000
  c.data.targets_length = 128  # median description ~80 pieces
  c.train.batch_size = 16
  c.train.num_steps = 900  # ~0.3 epoch; ~12 min on 2 CPU cores
  c.train.log_every = 25
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1
  c.checkpoint.every_steps = 250
  c.eval.batch_size = 64
  c.eval.metrics = "perplexity"
  if mode == "converged":
    converge(c, cap=30_000, every=500, window=3_000)  # 48,755 descriptions / 16 per batch
  elif mode:
    raise ValueError(f"unknown mode {mode!r}; use '<data dir>' or '<data dir>,converged'")
  return lock(c)
