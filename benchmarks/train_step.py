"""Training-step throughput: modjax's jitted train step vs transformers' PyTorch T5, on CPU.

For each shape, three steps run on the same shapes in the same process:

* ``modjax/adafactor``: the step ``modjax.train`` runs by default (``make_train_step`` +
  ``jit_train_step``: optax Adafactor with parameter-scaled steps, global-norm clipping at 1.0,
  the rsqrt schedule, the seq2seq cross-entropy, the state donated), compiled for one device;
* ``modjax/adamw``: the same step with ``optimizer.name = "adamw"`` (``optax.adamw``, clipping
  at 1.0, weight decay 0), the optimizer the PyTorch side uses;
* ``hf/adamw``: ``transformers.T5ForConditionalGeneration`` built from the same config (random
  init, ``train()`` so dropout is on), ``torch.optim.AdamW`` with PyTorch's defaults for the
  implementation (weight decay 0, as modjax's), as a user would write the loop: forward with
  ``labels``, ``loss.backward()``, ``clip_grad_norm_(1.0)``, ``optimizer.step()``,
  ``zero_grad()``.

Shapes (dropout applies on both sides, with the same rate):

* ``micro`` (``--quick``): the 2+2-layer test preset, batch 4 x inputs 32 / targets 16,
  dropout 0.1;
* ``tiny``: configs/tiny.py's model (vocabulary 256 rows), batch 32 x inputs 64 / targets 24,
  dropout 0 (the preset's);
* ``t5-small``: vocabulary 32128, batch 8 x inputs 256 / targets 64, dropout 0.1.

Timing (``benchmarks/harness.py``): each side's first call is untimed (modjax's compile time
= first call - median); then ``--rounds`` interleaved rounds each time ``--steps / --rounds``
consecutive steps of every side in turn, with a pause after each side (one framework's spinning
threads slow the other). Reported per side: the median step over all rounds (and the minimum),
tokens/s counting encoder and decoder tokens (batch x (inputs + targets)) and target tokens/s.
Both frameworks use every core (``torch.set_num_threads``; XLA's default). ``ratio_vs_hf`` (per
shape) is modjax's AdamW step against HF's AdamW step in tokens/s; ``ratio_vs_hf_adafactor``
uses modjax's default Adafactor step instead.

FLOPs: ``gflop_model`` counts the matmuls of the model, forward x 3 (the backward pass does
two matmuls per forward one): every projection, the attention scores and their weighted sum,
the FFN and the LM head, from the shapes (:func:`model_flops`). Achieved FLOP/s are that count
over each side's median step (the same work for both frameworks), and ``pct_peak`` quotes them
against the machine's peak float32 matmul FLOP/s, measured in the same run (before and after
the steps, the better counts). XLA's cost analysis of each compiled modjax step is reported too
(``gflop_xla``, ``pct_peak_xla``): it also counts elementwise work (norms, softmax, the dropout
hash's integer ops), so it moves when that work does; ``gflop_6nt`` is 6 x parameters x the
tokens that pass through them (no attention scores).

Run from the repository root:

    python -m benchmarks.train_step                    # tiny and t5-small, ~10 minutes on CPU
    python -m benchmarks.train_step --quick            # micro, 3 steps per side: a smoke test
    python -m benchmarks.train_step --presets t5-small --steps 12 --out /tmp/train_step.json
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import torch
import transformers

from benchmarks import harness
from modjax.core.presets import get_preset
from modjax.models import architecture_for
from modjax.train import losses
from modjax.train.defaults import base_config

# shape -> (preset, vocabulary rows, batch, inputs length, targets length, dropout)
SHAPES = {
  "micro": ("micro", 256, 4, 32, 16, 0.1),  # --quick: a smoke test of every side
  "tiny": ("tiny", 256, 32, 64, 24, 0.0),
  "t5-small": ("t5-small", 32128, 8, 256, 64, 0.1),
}
MODJAX_OPTIMIZERS = ("adafactor", "adamw")
HF_OPTIMIZER = "torch.optim.AdamW (PyTorch defaults, weight_decay=0), clip_grad_norm_(1.0)"
HF_LEARNING_RATE = 1e-3
TABLE = "preset side batch inputs targets compile_s step_ms tokens_per_s gflops_per_s pct_peak"
TABLE += " ratio_vs_hf"


def model_config(shape: str):
  preset, vocab_size, _, _, _, dropout = SHAPES[shape]
  return dataclasses.replace(get_preset(preset), vocab_size=vocab_size, dropout_rate=dropout)


def build_step(config, optimizer_name: str, num_steps: int):
  """(jitted step, initial state) for one device, as modjax.train builds them."""
  model = architecture_for(config)
  cfg = base_config().optimizer
  cfg.name = optimizer_name
  loss_fn = losses.task_loss(model, model.identity_plan())
  params = jax.jit(model.init)(jax.random.key(0))
  step, init = harness.train_step(model, loss_fn, params, cfg, num_steps)
  return step, init(params)


def random_batch(shape: str, seed: int) -> dict:
  _, vocab_size, batch, inputs, targets, _ = SHAPES[shape]
  return harness.seq2seq_batch(vocab_size, batch, inputs, targets, seed)


def shape_flops(params, batch: int, inputs: int, targets: int) -> float:
  """6 x parameters x tokens through them (forward 2, backward 4 FLOPs per parameter-token)."""
  count = harness.count_params
  encoder, decoder = count(params.get("encoder", {})), count(params.get("decoder", {}))
  # The output projection: its own lm_head, or the tied token embedding.
  head = count(params["lm_head"]) if "lm_head" in params else count(params["token_embedding"])
  return 6.0 * (encoder * batch * inputs + (decoder + head) * batch * targets)


def model_flops(config, batch: int, inputs: int, targets: int) -> float:
  """Matmul FLOPs of one T5 train step: 3 x the forward's (projections, attention scores and
  context, FFN, LM head; norms, softmax and the optimizer not counted)."""
  d, hk = config.d_model, config.num_heads * config.d_kv
  ffn = (3 if config.is_gated else 2) * d * config.d_ff
  s, t = batch * inputs, batch * targets  # encoder and decoder tokens

  def scores(queries: int, keys: int) -> int:  # q.k and p.v, summed over heads
    return 2 * 2 * batch * queries * keys * hk

  encoder = config.num_layers * (2 * s * (4 * d * hk + ffn) + scores(inputs, inputs))
  decoder = config.num_decoder_layers * (
    2 * t * (6 * d * hk + ffn)
    + 2 * s * 2 * d * hk
    + scores(targets, targets)
    + scores(targets, inputs)
  )
  head = 2 * t * d * config.vocab_size
  return 3.0 * (encoder + decoder + head)


def modjax_side(config, optimizer_name: str, batch: dict, num_steps: int, seed: int):
  """modjax's step; each call's loss lands in ``holder``, as does ``flops``: () -> (XLA's FLOPs
  per step, 6 x params x tokens), for after the timed calls (compiling it first would make
  the first call's compile time vanish)."""
  step, state = build_step(config, optimizer_name, num_steps)
  rng = jax.random.key(seed)
  holder = {"state": state}

  def call():
    holder["state"], metrics = step(holder["state"], {}, batch, rng)
    holder["loss"] = float(metrics["loss"])

  def flops():
    rows, inputs = batch["encoder_input_tokens"].shape
    targets = batch["decoder_target_tokens"].shape[1]
    xla = harness.xla_cost(step, holder["state"], {}, batch, rng)["flops"]
    return xla, shape_flops(holder["state"].params, rows, inputs, targets)

  holder["flops"] = flops
  row = {"params_m": harness.count_params(state.params) / 1e6}
  row["optimizer"] = f"optax.{optimizer_name} via modjax.train.optim (clip_by_global_norm 1.0)"
  return harness.Side(f"modjax/{optimizer_name}", call, row, holder=holder)


def hf_config(config) -> transformers.T5Config:
  """transformers' T5Config with the same architecture and dropout as a modjax T5Config."""
  fields = [f.name for f in dataclasses.fields(config) if f.name not in ("param_dtype", "dtype")]
  return transformers.T5Config(**{name: getattr(config, name) for name in fields})


def hf_side(config, batch: dict, seed: int) -> harness.Side:
  transformers.logging.set_verbosity_error()
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(hf_config(config)).float().train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=HF_LEARNING_RATE, weight_decay=0.0)
  enc, dec, labels = (
    torch.tensor(np.asarray(batch[k]), dtype=torch.long)
    for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
  )
  mask, holder = torch.ones_like(enc), {}

  def call():
    out = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    holder["loss"] = float(out.loss.detach())

  row = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
  row |= {"optimizer": HF_OPTIMIZER, "torch_threads": torch.get_num_threads()}
  return harness.Side("hf/adamw", call, row, holder=holder)


def time_shape(shape: str, args) -> list[harness.Side]:
  """Every side's first call (untimed), then ``--rounds`` interleaved rounds of
  ``--steps / --rounds`` steps per side, with a pause after each side's."""
  batch = random_batch(shape, args.seed)
  config = model_config(shape)
  sides = [
    modjax_side(config, name, batch, args.steps + 1, args.seed) for name in MODJAX_OPTIMIZERS
  ]
  if args.hf:
    sides.append(hf_side(config, batch, args.seed))
  harness.time_sides(sides, args.rounds, calls=max(args.steps // args.rounds, 1), pause=2.0)
  return sides


def shape_summary(shape: str, sides: list[harness.Side], peak_flops: float) -> dict:
  """The shape's summary with one row per side (module docstring)."""
  _, vocab_size, batch, inputs, targets, dropout = SHAPES[shape]
  work = model_flops(model_config(shape), batch, inputs, targets)  # the same for every side
  rows = []
  for side in sides:
    loss = side.holder["loss"]
    assert np.isfinite(loss), f"{shape} {side.name}: loss {loss}"
    median = harness.median(side.seconds)
    row = {"preset": shape, "side": side.name, "batch": batch, "inputs": inputs}
    row |= {"targets": targets, "vocab": vocab_size, "dropout": dropout, **side.row}
    row |= {"first_call_s": side.first_s, **harness.milliseconds(side.seconds)}
    row["tokens_per_s"] = batch * (inputs + targets) / median
    row["target_tokens_per_s"] = batch * targets / median
    row |= {"gflop_model": work / 1e9, "gflops_per_s": work / median / 1e9}
    row["pct_peak"] = 100.0 * work / median / peak_flops
    row["final_loss"] = loss
    if "flops" in side.holder:  # modjax's
      xla, six_nt = side.holder["flops"]()
      row["compile_s"] = max(side.first_s - median, 0.0)
      row |= {"gflop_xla": xla / 1e9, "gflop_6nt": six_nt / 1e9}
      row["pct_peak_xla"] = 100.0 * xla / median / peak_flops
    rows.append(row)
  by_side = {row["side"]: row for row in rows}
  summary = {"preset": shape, "batch": batch, "inputs": inputs, "targets": targets}
  summary["dropout"] = dropout
  if "hf/adamw" in by_side:
    for row in rows:
      row["ratio_vs_hf"] = row["tokens_per_s"] / by_side["hf/adamw"]["tokens_per_s"]
    summary["ratio_vs_hf"] = by_side["modjax/adamw"]["ratio_vs_hf"]
    summary["ratio_vs_hf_adafactor"] = by_side["modjax/adafactor"]["ratio_vs_hf"]
  summary["pct_peak"] = {row["side"]: row["pct_peak"] for row in rows}
  return summary | {"rows": rows}


def parse_args(argv=None):
  p = harness.parser(__doc__, "train_step")
  p.add_argument("--presets", default=None, help="comma-separated shapes (default tiny,t5-small)")
  p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 12)")
  p.add_argument("--rounds", type=int, default=None, help="rounds over the sides (default 3)")
  p.add_argument("--no-hf", dest="hf", action="store_false", help="modjax's steps only")
  args = p.parse_args(argv)
  harness.defaults(args, presets=("micro", "tiny,t5-small"), steps=(3, 12), rounds=(1, 3))
  args.presets = args.presets.split(",")
  unknown = [name for name in args.presets if name not in SHAPES]
  if unknown:
    p.error(f"unknown preset(s) {unknown}; choose from {sorted(SHAPES)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  load_start = os.getloadavg()
  torch.set_num_threads(os.cpu_count() or 1)
  print(
    f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
    f"{transformers.__version__}, {os.cpu_count()} CPU cores"
  )

  def run():
    timed = []
    for preset in args.presets:
      harness.say(f"{preset}: compiling and timing {args.steps} steps per side ...")
      timed.append((preset, time_shape(preset, args)))
    return timed

  timed, limits = harness.around(args.quick, run)
  shapes = [shape_summary(*t, limits["peak_flops"]) for t in timed]
  table = harness.table([row for s in shapes for row in s["rows"]], TABLE)
  print(
    "tokens = batch x (inputs + targets); gflops_per_s = the model's matmul FLOPs (fwd x 3) / "
    "each side's median step; pct_peak against this run's measured peak matmul FLOP/s; "
    "ratio_vs_hf = tokens/s over HF's (AdamW) on the same shape."
  )
  optimizers = {
    f"modjax/{n}": f"optax.{n} (modjax.train.optim, defaults)" for n in MODJAX_OPTIMIZERS
  }
  harness.report(
    args,
    "train_step",
    "steps rounds",
    optimizers={**optimizers, "hf/adamw": HF_OPTIMIZER},
    # 1/5/15-minute load averages: other work on the machine slows both sides, PyTorch more.
    load_avg_start=load_start,
    load_avg_end=os.getloadavg(),
    versions={"torch": torch.__version__, "transformers": transformers.__version__},
    limits=limits,
    results=shapes,
    table=table,
  )


if __name__ == "__main__":
  main()
