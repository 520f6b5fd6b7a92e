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

Timing: each side's first call is untimed (modjax's compile time = first call - median); then
``--rounds`` rounds each time ``--steps / --rounds`` consecutive steps of every side in turn,
with a pause between sides (``hardware.settle``: one framework's spinning threads slow the
other). Reported per side: the median step over all rounds (and the minimum), tokens/s counting
encoder and decoder tokens (batch x (inputs + targets)) and target tokens/s. Both frameworks use
every core (``torch.set_num_threads``; XLA's default). ``ratio_vs_hf`` (per shape) is modjax's
AdamW step against HF's AdamW step in tokens/s; ``ratio_vs_hf_adafactor`` uses modjax's default
Adafactor step instead.

FLOPs: ``gflop_model`` counts the matmuls of the model, forward x 3 (the backward pass does
two matmuls per forward one): every projection, the attention scores and their weighted sum,
the FFN and the LM head, from the shapes (:func:`model_flops`). Achieved FLOP/s are that count
over each side's median step (the same work for both frameworks), and ``pct_peak`` quotes them
against the machine's peak float32 matmul FLOP/s, measured in the same run by
``benchmarks/hardware.py``. XLA's cost analysis of each compiled modjax step is reported too
(``gflop_xla``, ``pct_peak_xla``): it also counts elementwise work (norms, softmax, the dropout
hash's integer ops), so it moves when that work does; ``gflop_6nt`` is 6 x parameters x the
tokens that pass through them (no attention scores).

Run from the repository root:

    python -m benchmarks.train_step                    # tiny and t5-small, ~10 minutes on CPU
    python -m benchmarks.train_step --quick            # micro, 3 steps per side: a smoke test
    python -m benchmarks.train_step --presets t5-small --steps 12 --out /tmp/train_step.json

On a shared machine the numbers are noisy: compare within one run, and over several runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from modjax import sharding
from modjax.models import architecture_for
from modjax.presets import get_preset
from modjax.train import losses, optim
from modjax.train.defaults import base_config
from modjax.train.step import TrainState, init_state, jit_train_step, make_train_step

try:
  from benchmarks import hardware
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
  import hardware

# shape -> (preset, vocabulary rows, batch, inputs length, targets length, dropout)
SHAPES = {
  "micro": ("micro", 256, 4, 32, 16, 0.1),  # --quick: a smoke test of every side
  "tiny": ("tiny", 256, 32, 64, 24, 0.0),
  "t5-small": ("t5-small", 32128, 8, 256, 64, 0.1),
}
MODJAX_OPTIMIZERS = ("adafactor", "adamw")
HF_OPTIMIZER = "torch.optim.AdamW (PyTorch defaults, weight_decay=0), clip_grad_norm_(1.0)"
HF_LEARNING_RATE = 1e-3
TABLE = [
  "preset",
  "side",
  "batch",
  "inputs",
  "targets",
  "compile_s",
  "step_ms",
  "tokens_per_s",
  "gflops_per_s",
  "pct_peak",
  "ratio_vs_hf",
]


def model_config(shape: str):
  preset, vocab_size, _, _, _, dropout = SHAPES[shape]
  return dataclasses.replace(get_preset(preset), vocab_size=vocab_size, dropout_rate=dropout)


def build_step(config, optimizer_name: str, num_steps: int):
  """(jitted step, initial state) for one CPU device, as modjax.train builds them."""
  model = architecture_for(config)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  param_shardings = sharding.shardings_for(model.param_axes(), shapes, mesh)
  cfg = base_config().optimizer
  cfg.name = optimizer_name
  optimizer, schedule = optim.make_optimizer(cfg, num_steps)
  params = jax.jit(model.init, out_shardings=param_shardings)(jax.random.key(0))
  state = jax.jit(lambda p: init_state(p, optimizer))(params)
  state_shardings = TrainState(
    step=sharding.replicated(mesh),
    params=param_shardings,
    opt_state=jax.tree.map(lambda x: x.sharding, state.opt_state),
  )
  loss_fn = losses.seq2seq_loss(model, model.identity_plan())
  step = jit_train_step(
    make_train_step(loss_fn, optimizer, schedule=schedule), mesh, state_shardings, {}
  )
  return step, state


def random_batch(vocab_size: int, batch: int, inputs: int, targets: int, seed: int) -> dict:
  """An encoder-decoder batch of random tokens (numpy; no padding, every target weighted)."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab_size, (batch, inputs), dtype=np.int32)
  tgt = rng.integers(2, vocab_size, (batch, targets), dtype=np.int32)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return {
    "encoder_input_tokens": enc,
    "decoder_input_tokens": dec_in,
    "decoder_target_tokens": tgt,
    "decoder_loss_weights": np.ones_like(tgt),
  }


def shape_flops(params, batch: int, inputs: int, targets: int) -> float:
  """6 x parameters x tokens through them (forward 2, backward 4 FLOPs per parameter-token)."""

  def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

  encoder = count(params.get("encoder", {}))
  decoder = count(params.get("decoder", {}))
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


def xla_flops(step, state, batch, rng) -> float:
  cost = step.lower(state, {}, batch, rng).compile().cost_analysis()
  if isinstance(cost, list | tuple):  # older JAX: one dict per computation
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


@dataclasses.dataclass
class Side:
  """One framework's step on one shape: ``call()`` runs a step and returns its loss."""

  name: str
  call: object
  info: dict
  flops: object = None  # modjax: () -> (XLA's FLOPs per step, 6 x params x tokens)
  seconds: list = dataclasses.field(default_factory=list)
  first_s: float = 0.0
  loss: float = float("nan")


def modjax_side(config, optimizer_name: str, data: dict, num_steps: int, seed: int) -> Side:
  step, state = build_step(config, optimizer_name, num_steps)
  batch = {k: jnp.asarray(v) for k, v in data.items()}
  rng = jax.random.key(seed)
  holder = {"state": state}

  def call():
    holder["state"], metrics = step(holder["state"], {}, batch, rng)
    return float(hardware.block(metrics)["loss"])

  def flops():  # after the timed calls: reuses their executable
    rows, inputs = data["encoder_input_tokens"].shape
    targets = data["decoder_target_tokens"].shape[1]
    params = holder["state"].params
    return xla_flops(step, holder["state"], batch, rng), shape_flops(params, rows, inputs, targets)

  info = {
    "params_m": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
    "optimizer": f"optax.{optimizer_name} via modjax.train.optim (clip_by_global_norm 1.0)",
  }
  return Side(f"modjax/{optimizer_name}", call, info, flops=flops)


def hf_config(config) -> transformers.T5Config:
  """transformers' T5Config with the same architecture and dropout as a modjax T5Config."""
  fields = [f.name for f in dataclasses.fields(config) if f.name not in ("param_dtype", "dtype")]
  return transformers.T5Config(**{name: getattr(config, name) for name in fields})


def hf_side(config, data: dict, seed: int) -> Side:
  transformers.logging.set_verbosity_error()
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(hf_config(config)).float().train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=HF_LEARNING_RATE, weight_decay=0.0)
  enc = torch.tensor(data["encoder_input_tokens"], dtype=torch.long)
  dec = torch.tensor(data["decoder_input_tokens"], dtype=torch.long)
  labels = torch.tensor(data["decoder_target_tokens"], dtype=torch.long)
  mask = torch.ones_like(enc)

  def call():
    out = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())

  info = {
    "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    "optimizer": HF_OPTIMIZER,
    "torch_threads": torch.get_num_threads(),
  }
  return Side("hf/adamw", call, info)


def time_sides(sides: list[Side], steps: int, rounds: int):
  """First call of each side (untimed), then ``rounds`` rounds of steps/rounds steps per side."""
  for side in sides:
    start = time.perf_counter()
    side.loss = side.call()
    side.first_s = time.perf_counter() - start
    hardware.settle()
  per_round = max(steps // rounds, 1)
  for _ in range(rounds):
    for side in sides:
      for _ in range(per_round):
        start = time.perf_counter()
        side.loss = side.call()
        side.seconds.append(time.perf_counter() - start)
      hardware.settle()


def run_shape(shape: str, steps: int, rounds: int, limits: dict, seed: int, hf: bool) -> dict:
  """Times every side on one shape; returns the shape's summary with one row per side."""
  _, vocab_size, batch, inputs, targets, dropout = SHAPES[shape]
  config = model_config(shape)
  data = random_batch(vocab_size, batch, inputs, targets, seed)
  sides = [modjax_side(config, name, data, steps + 1, seed) for name in MODJAX_OPTIMIZERS]
  if hf:
    sides.append(hf_side(config, data, seed))
  time_sides(sides, steps, rounds)
  tokens = batch * (inputs + targets)
  flops = {side.name: side.flops() for side in sides if side.flops is not None}
  work = model_flops(config, batch, inputs, targets)  # the same for every side
  rows = []
  for side in sides:
    assert np.isfinite(side.loss), f"{shape} {side.name}: loss {side.loss}"
    median = hardware.median(side.seconds)
    row = {
      "preset": shape,
      "side": side.name,
      "batch": batch,
      "inputs": inputs,
      "targets": targets,
      "vocab": vocab_size,
      "dropout": dropout,
      **side.info,
      "first_call_s": side.first_s,
      "step_ms": 1e3 * median,
      "step_ms_min": 1e3 * min(side.seconds),
      "step_ms_all": [1e3 * s for s in side.seconds],
      "tokens_per_s": tokens / median,
      "target_tokens_per_s": batch * targets / median,
      "gflop_model": work / 1e9,
      "gflops_per_s": work / median / 1e9,
      "pct_peak": 100.0 * work / median / limits["peak_flops"],
      "final_loss": side.loss,
    }
    if side.name in flops:
      row["compile_s"] = max(side.first_s - median, 0.0)
      row["gflop_xla"] = flops[side.name][0] / 1e9
      row["gflop_6nt"] = flops[side.name][1] / 1e9
      row["pct_peak_xla"] = 100.0 * flops[side.name][0] / median / limits["peak_flops"]
    rows.append(row)
  by_side = {row["side"]: row for row in rows}
  summary = {"preset": shape, "batch": batch, "inputs": inputs, "targets": targets}
  summary["dropout"] = dropout
  if hf:
    hf_rate = by_side["hf/adamw"]["tokens_per_s"]
    for row in rows:
      row["ratio_vs_hf"] = row["tokens_per_s"] / hf_rate
    summary["ratio_vs_hf"] = by_side["modjax/adamw"]["ratio_vs_hf"]
    summary["ratio_vs_hf_adafactor"] = by_side["modjax/adafactor"]["ratio_vs_hf"]
  summary["pct_peak"] = {row["side"]: row["pct_peak"] for row in rows}
  summary["rows"] = rows
  return summary


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--presets", default=None, help="comma-separated shapes (default tiny,t5-small)")
  p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 12)")
  p.add_argument("--rounds", type=int, default=None, help="rounds over the sides (default 3)")
  p.add_argument("--no-hf", dest="hf", action="store_false", help="modjax's steps only")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "train_step.json"))
  p.add_argument("--quick", action="store_true", help="micro only, 3 steps per side: a smoke test")
  args = p.parse_args(argv)
  args.presets = (args.presets or ("micro" if args.quick else "tiny,t5-small")).split(",")
  unknown = [name for name in args.presets if name not in SHAPES]
  if unknown:
    p.error(f"unknown preset(s) {unknown}; choose from {sorted(SHAPES)}")
  args.steps = args.steps or (3 if args.quick else 12)
  args.rounds = args.rounds or (1 if args.quick else 3)
  return args


def best_limits(before: dict, quick: bool, shapes: list[dict]) -> dict:
  """The ceilings measured again after the steps; the better peak of the two counts (a
  measurement disturbed by other work only underestimates it), and every row's ``pct_peak`` is
  recomputed against it."""
  after = hardware.measure_limits(512, 32 * 2**20) if quick else hardware.measure_limits()
  best = max((before, after), key=lambda lim: lim["peak_flops"])
  for row in (row for s in shapes for row in s["rows"]):
    row["pct_peak"] = 100.0 * row["gflops_per_s"] * 1e9 / best["peak_flops"]
  print(
    f"peak measured before / after: {before['peak_flops'] / 1e9:.1f} / "
    f"{after['peak_flops'] / 1e9:.1f} GFLOP/s; the better counts"
  )
  return {
    **best,
    "peak_flops_before": before["peak_flops"],
    "peak_flops_after": after["peak_flops"],
  }


def main(argv=None):
  args = parse_args(argv)
  load_start = os.getloadavg()
  torch.set_num_threads(os.cpu_count() or 1)
  print(
    f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
    f"{transformers.__version__}, {os.cpu_count()} CPU cores"
  )
  limits = hardware.measure_limits(512, 32 * 2**20) if args.quick else hardware.measure_limits()
  print(
    f"measured peak: {limits['peak_flops'] / 1e9:.1f} GFLOP/s (f32 {limits['matmul_n']}^2 "
    f"matmul); bandwidth {limits['peak_bytes_per_s'] / 1e9:.1f} GB/s"
  )
  hardware.settle()
  shapes = []
  for preset in args.presets:
    print(f"{preset}: compiling and timing {args.steps} steps per side ...", flush=True)
    shapes.append(run_shape(preset, args.steps, args.rounds, limits, args.seed, args.hf))
  limits = best_limits(limits, args.quick, shapes)
  print()
  table = hardware.print_table([row for s in shapes for row in s["rows"]], TABLE)
  print(
    "tokens = batch x (inputs + targets); gflops_per_s = the model's matmul FLOPs (fwd x 3) / "
    "each side's median step; pct_peak against this run's measured peak matmul FLOP/s; "
    "ratio_vs_hf = tokens/s over HF's (AdamW) on the same shape."
  )
  path = hardware.write_json(
    args.out,
    {
      "benchmark": "train_step",
      "quick": args.quick,
      "steps": args.steps,
      "rounds": args.rounds,
      "optimizers": {
        **{f"modjax/{n}": f"optax.{n} (modjax.train.optim, defaults)" for n in MODJAX_OPTIMIZERS},
        "hf/adamw": HF_OPTIMIZER,
      },
      "machine": hardware.machine(),
      # 1/5/15-minute load averages: other work on the machine slows both sides, PyTorch more.
      "load_avg_start": load_start,
      "load_avg_end": os.getloadavg(),
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
      "limits": limits,
      "results": shapes,
      "table": table,
    },
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
