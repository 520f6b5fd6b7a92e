"""The CPU teacher: a small T5 trained from scratch on DDTP-summ (package description ->
one-line synopsis), the headline-style summarisation corpus in ../shared/data/ddtp-summ.
The arg is the corpus folder, optionally followed by ``,6`` for the 6+6-layer teacher that
Modular Transformers distils (configs/modular_t5.py:ddtp_summ), trained until its validation
loss improves by less than 1% over an epoch (experiments/converged_teacher/).

  python -m modjax.train --config configs/ddtp_summ.py:../shared/data/ddtp-summ \\
      --config.workdir=runs/ddtp_summ
  python -m modjax.evaluate --config configs/ddtp_summ.py:../shared/data/ddtp-summ \\
      --config.workdir=runs/ddtp_summ --config.eval.max_examples=0
  python -m modjax.train --config configs/ddtp_summ.py:../shared/data/ddtp-summ,6 \\
      --config.workdir=runs/ddtp_summ6
"""

from modjax.train.defaults import base_config, converge, jsonl_corpus, lock


def get_config(arg: str = "../shared/data/ddtp-summ"):
  data_dir, _, layers = (arg or "../shared/data/ddtp-summ").partition(",")
  c = jsonl_corpus(base_config(), data_dir)
  c.model.preset = "small-cpu"
  c.data.inputs_prefix = "summarize: "
  c.data.vocab_size = 4000  # trained on the training split into workdir/vocab
  c.data.inputs_length = 96  # median description ~80 pieces
  c.data.targets_length = 24
  c.train.batch_size = 32
  c.train.num_steps = 750
  c.train.log_every = 25
  c.optimizer.name = "adafactor"  # relative (parameter-scaled) steps suit T5's std-1 embeddings
  c.optimizer.learning_rate = 0.01
  c.optimizer.schedule = "rsqrt"  # T5's: linear warm-up, then lr * sqrt(warmup / step)
  c.optimizer.warmup_steps = 100
  c.checkpoint.every_steps = 250
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 24
  c.eval.metrics = "rouge"
  if layers == "6":  # the Modular Transformers teacher: 6+6 layers, trained to a plateau
    c.model.preset = "small-cpu-6"
    converge(c, cap=30_000, every=500, window=1_500)  # ~one epoch: 48,755 examples / 32 per batch
  elif layers:
    raise ValueError(f"unknown teacher depth {layers!r}; use '<data dir>' or '<data dir>,6'")
  return lock(c)
