"""Mixture-of-Modules GPT-2 decoders (modjax/methods/mom). The arg is ``<size>[,<data dir>]``:

* ``tiny``: gpt2-tiny shapes on the embedded task (no downloads; about a minute on CPU):
  1 bottom layer, one MoM block of 2 attention + 2 FFN modules (K=1, H=2, SKIP), 1 top layer:
  the parameters of a 4-layer GPT-2;
* ``ddtp``: configs/ddtp_lm.py's data, vocabulary and optimizer (GPT-2-shaped LM on the
  DDTP-summ descriptions; data dir default ../shared/data/ddtp-summ): 1 bottom layer, one MoM
  block of 4 + 4 modules (K=1, H=4, SKIP), 1 top layer: the parameters of its 6-layer vanilla;
* ``ddtp_authors``: ``ddtp`` with the authors' defaults (gzhch/Mixture-of-Modules' pretraining
  script): an anchor layer after the MoM block and H=8 rounds; 1 bottom layer, the block of
  4 + 4 modules, the anchor, no top layer: again the parameters of the 6-layer vanilla.

From scratch, or phase two from a vanilla run (its layers map into the pools, its vocabulary is
used):

  python -m modjax.train --config configs/mom_gpt2.py:tiny --config.workdir=/tmp/modjax/mom_tiny
  python -m modjax.train --config configs/ddtp_lm.py:../shared/data/ddtp-summ \\
      --config.workdir=runs/ddtp_lm
  python -m modjax.train --config configs/mom_gpt2.py:ddtp --config.workdir=runs/mom_ddtp \\
      --config.mom.init_from=runs/ddtp_lm

Every MoM setting is ``--config.mom.<key>`` (modjax/methods/mom/structure.py: router, top_k,
rounds, skip, anchor, weighted_qkv, balance, dispatch, capacity_factor, ...). Optimizer: AdamW
(0.9, 0.95), eps 1e-5, weight decay 0.1, cosine, clip 1.0, lr 1e-3 (the paper's).

Gates (``--config.mom.gate``): ``renormalized`` (the default, the paper's renormalised top-K; with
K=1 its kept weight is always 1, so only the balancing loss trains the routers),
``straight_through`` (the same forward pass, with the gradient of log p: the task loss trains the
routers), ``softmax`` (Switch's: the kept probabilities as they are) and ``raw`` (the authors'
non-softmax routers). Capacity dispatch drops routed tokens when a module's buffer is full: the
share dropped is the metric ``router/dropped`` of every step and its mean over the run is in the
workdir's ``compute.json``; ``--config.mom.capacity_factor=0`` drops nothing.

Baselines (modjax/methods/mom/baselines.py) from the same config, data and start:
``--config.mom.baseline=vanilla`` (the MoM's layers without routers), ``wider_ffn`` (the MoM's
parameters, routers included, as wider FFNs) or ``extra_layer`` (as whole extra layers). Equal
compute: ``python -m modjax.methods.mom.baselines --config configs/mom_gpt2.py:ddtp`` prints the
steps of each that spend the MoM's training FLOPs. ``--config.mom.continue_schedule=True`` with
``mom.init_from`` a training workdir continues that run's learning-rate schedule from its step
(no new warm-up; ``--config.optimizer.schedule_steps`` gives it a longer horizon). Every run
writes ``compute.json``: parameters, training FLOPs, capacity drops.
"""

from modjax.train.defaults import base_config, lock, sibling_config, with_method

SIZES = ("tiny", "ddtp", "ddtp_authors")


def _ddtp_lm(data_dir: str):
  return sibling_config(__file__, "ddtp_lm.py", data_dir)


def _tiny():
  c = base_config()
  c.model.preset = "gpt2-tiny"
  c.data.task = "embedded_lead"
  c.data.vocab_size = 240
  c.data.targets_length = 32
  c.train.batch_size = 16
  c.train.num_steps = 150
  c.train.log_every = 25
  c.optimizer.warmup_steps = 20
  c.checkpoint.every_steps = 50
  c.eval.metrics = "perplexity"
  return c


def _optimizer(c):
  o = c.optimizer
  o.name, o.learning_rate, o.schedule = "adamw", 1e-3, "cosine"
  o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip = 0.9, 0.95, 1e-5, 0.1, 1.0


def get_config(arg: str = "tiny"):
  size, data_dir = (arg.split(",", 1) + [""])[:2]
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; use one of {SIZES}")
  if size == "tiny" and data_dir:
    raise ValueError("the tiny size reads the embedded task; give no data dir")
  c = _tiny() if size == "tiny" else _ddtp_lm(data_dir or "../shared/data/ddtp-summ")
  with_method(c, "mom")
  _optimizer(c)
  m = c.mom
  m.bottom_layers, m.num_blocks, m.top_layers, m.anchor, m.skip = 1, 1, 1, False, True
  m.top_k = 1
  if size == "tiny":
    m.num_attn, m.num_ffn, m.rounds, m.router_dim = 2, 2, 2, 64
  else:
    m.num_attn, m.num_ffn, m.rounds = 4, 4, 4
  if size == "ddtp_authors":
    m.anchor, m.rounds, m.top_layers = True, 8, 0
  return lock(c)
