"""Training-step throughput: modjax's jitted train step vs transformers' PyTorch T5, on CPU.

Per shape, three steps on the same shapes in one process: ``modjax/adafactor`` (what
``modjax.train`` runs by default: optax Adafactor, global-norm clipping at 1.0, the rsqrt
schedule, the state donated, one device), ``modjax/adamw`` (``optimizer.name = "adamw"``, weight
decay 0) and ``hf/adamw`` (``T5ForConditionalGeneration`` from the same config in ``train()``
mode, ``torch.optim.AdamW`` with PyTorch's defaults, the loop a user writes: forward with
``labels``, ``backward``, ``clip_grad_norm_(1.0)``, ``step``, ``zero_grad``). Shapes, dropout on
both sides alike: ``micro`` (``--quick``: batch 4 x 32 / 16, dropout 0.1), ``tiny`` (configs/
tiny.py's model, 256-row vocabulary, 32 x 64 / 24, dropout 0), ``t5-small`` (vocabulary 32128,
8 x 256 / 64, dropout 0.1).

Each side's first call is untimed (compile time = first call - median); then ``--rounds``
interleaved rounds of ``--steps / --rounds`` steps per side, a pause after each side (one
framework's spinning threads slow the other); both use every core. Per side: the median step,
tokens/s (batch x (inputs + targets)) and target tokens/s; ``ratio_vs_hf`` is modjax's AdamW (and
``ratio_vs_hf_adafactor`` its Adafactor) step over HF's in tokens/s. ``gflop_model``: the model's
matmul FLOPs x 3 (``modjax.models.cost``), the same work on every side; ``pct_peak`` against the
peak float32 matmul FLOP/s measured in the same run. XLA's count (``gflop_xla``: elementwise work
too) and 6 x parameters x tokens (``gflop_6nt``) are reported beside it.

    python -m benchmarks.train_step                    # tiny and t5-small, ~10 minutes on CPU
    python -m benchmarks.train_step --quick            # micro, 3 steps per side: a smoke test
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
from modjax.models import architecture_for, cost
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
  """Matmul FLOPs of one T5 train step: 3 x the teacher-forced forward's (``modjax.models.cost``:
  projections, attention scores and context, FFN, LM head; norms, softmax, optimizer left out)."""
  model = architecture_for(config)
  work = cost.plan_cost(
    model, model.identity_plan(), batch=batch, input_length=inputs, target_length=targets
  )
  return 3.0 * work.forward_flops


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


def hf_side(config, batch: dict, seed: int) -> harness.Side:
  transformers.logging.set_verbosity_error()
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(harness.hf_t5_config(config)).float().train()
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
  p.option("--presets", "micro", "tiny,t5-small", str, "comma-separated shapes")
  p.option("--steps", 3, 12, help="timed steps per side")
  p.option("--rounds", 1, 3, help="rounds over the sides")
  p.add_argument("--no-hf", dest="hf", action="store_false", help="modjax's steps only")
  args = p.parse_args(argv)
  args.presets = args.presets.split(",")
  unknown = [name for name in args.presets if name not in SHAPES]
  if unknown:
    p.error(f"unknown preset(s) {unknown}; choose from {sorted(SHAPES)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(os.cpu_count() or 1)

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
  out = {"optimizers": {**optimizers, "hf/adamw": HF_OPTIMIZER}, "limits": limits}
  harness.report(args, "steps rounds", **out, results=shapes, table=table)


if __name__ == "__main__":
  main()
