"""Training-step throughput of modjax's jitted train step on this machine (CPU by default).

For each preset the step that ``modjax.train`` runs (``make_train_step`` + ``jit_train_step``:
Adafactor with global-norm clipping, the seq2seq cross-entropy, dropout as the preset sets it,
the state donated) is compiled for one device and called on random token batches of fixed shape:

* ``tiny``: configs/tiny.py's shapes (vocabulary 240 -> 256 rows, batch 32 x inputs 64 / targets 24)
* ``t5-small``: vocabulary 32128, batch 8 x inputs 128 / targets 32

Reported per preset: the median of ``--steps`` timed steps after the first call (steady state);
compile time as the first call minus that median; tokens/s counting encoder and decoder tokens
(batch x (inputs + targets)) and target tokens/s; model FLOPs per step from XLA's cost analysis
of the compiled step and from the shapes (6 x parameters x the tokens that pass through them:
encoder parameters x encoder tokens, decoder parameters and the output projection x decoder
tokens; attention scores not counted); achieved FLOP/s (XLA's count / median step time) and its
share of the machine's peak float32 matmul FLOP/s, measured in the same run by
``benchmarks/hardware.py``.

Run from the repository root:

    python -m benchmarks.train_step                    # tiny and t5-small, a few minutes on CPU
    python -m benchmarks.train_step --quick            # tiny only, 3 steps: a smoke test
    python -m benchmarks.train_step --presets tiny --steps 20 --out /tmp/train_step.json

On a shared machine the numbers are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

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

# preset -> (vocabulary rows, batch, inputs length, targets length)
SHAPES = {
  "tiny": (256, 32, 64, 24),
  "t5-small": (32128, 8, 128, 32),
}
TABLE = [
  "preset",
  "params_m",
  "batch",
  "inputs",
  "targets",
  "compile_s",
  "step_ms",
  "tokens_per_s",
  "target_tokens_per_s",
  "gflop_xla",
  "gflop_6nt",
  "gflops_per_s",
  "pct_peak",
]


def build_step(preset: str, vocab_size: int, num_steps: int):
  """(jitted step, initial state, model) for one CPU device, as modjax.train builds them."""
  model = architecture_for(dataclasses.replace(get_preset(preset), vocab_size=vocab_size))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  param_shardings = sharding.shardings_for(model.param_axes(), shapes, mesh)
  optimizer, schedule = optim.make_optimizer(base_config().optimizer, num_steps)
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
  return step, state, model


def random_batch(vocab_size: int, batch: int, inputs: int, targets: int, seed: int) -> dict:
  """An encoder-decoder batch of random tokens (no padding, every target weighted)."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab_size, (batch, inputs), dtype=np.int32)
  tgt = rng.integers(2, vocab_size, (batch, targets), dtype=np.int32)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  batch_arrays = {
    "encoder_input_tokens": enc,
    "decoder_input_tokens": dec_in,
    "decoder_target_tokens": tgt,
    "decoder_loss_weights": np.ones_like(tgt),
  }
  return {k: jnp.asarray(v) for k, v in batch_arrays.items()}


def shape_flops(params, batch: int, inputs: int, targets: int) -> float:
  """6 x parameters x tokens through them (forward 2, backward 4 FLOPs per parameter-token)."""

  def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

  encoder = count(params.get("encoder", {}))
  decoder = count(params.get("decoder", {}))
  # The output projection: its own lm_head, or the tied token embedding.
  head = count(params["lm_head"]) if "lm_head" in params else count(params["token_embedding"])
  return 6.0 * (encoder * batch * inputs + (decoder + head) * batch * targets)


def xla_flops(step, state, batch, rng) -> float:
  cost = step.lower(state, {}, batch, rng).compile().cost_analysis()
  if isinstance(cost, list | tuple):  # older JAX: one dict per computation
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def run_preset(preset: str, steps: int, limits: dict, seed: int) -> dict:
  vocab_size, batch, inputs, targets = SHAPES[preset]
  step, state, model = build_step(preset, vocab_size, num_steps=steps + 1)
  data = random_batch(vocab_size, batch, inputs, targets, seed)
  rng = jax.random.key(seed)
  params_count = sum(x.size for x in jax.tree.leaves(state.params))
  flops_shapes = shape_flops(state.params, batch, inputs, targets)

  start = time.perf_counter()
  state, metrics = step(state, {}, data, rng)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, {}, data, rng)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  median = hardware.median(seconds)
  flops_xla = xla_flops(step, state, data, rng)  # after the calls: reuses their executable
  loss = float(metrics["loss"])
  assert np.isfinite(loss), f"{preset}: loss {loss}"
  achieved = flops_xla / median
  return {
    "preset": preset,
    "params_m": params_count / 1e6,
    "batch": batch,
    "inputs": inputs,
    "targets": targets,
    "vocab": vocab_size,
    "dropout": getattr(model.config, "dropout_rate", 0.0),
    "compile_s": max(first - median, 0.0),
    "first_call_s": first,
    "step_ms": 1e3 * median,
    "step_ms_min": 1e3 * min(seconds),
    "step_ms_all": [1e3 * s for s in seconds],
    "tokens_per_s": batch * (inputs + targets) / median,
    "target_tokens_per_s": batch * targets / median,
    "gflop_xla": flops_xla / 1e9,
    "gflop_6nt": flops_shapes / 1e9,
    "gflops_per_s": achieved / 1e9,
    "pct_peak": 100.0 * achieved / limits["peak_flops"],
    "final_loss": loss,
  }


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--presets", default=None, help="comma-separated (default tiny,t5-small)")
  p.add_argument("--steps", type=int, default=None, help="timed steps per preset (default 10)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "train_step.json"))
  p.add_argument("--quick", action="store_true", help="tiny only, 3 steps: a smoke test")
  args = p.parse_args(argv)
  args.presets = (args.presets or ("tiny" if args.quick else "tiny,t5-small")).split(",")
  unknown = [name for name in args.presets if name not in SHAPES]
  if unknown:
    p.error(f"unknown preset(s) {unknown}; choose from {sorted(SHAPES)}")
  args.steps = args.steps or (3 if args.quick else 10)
  return args


def main(argv=None):
  args = parse_args(argv)
  print(
    f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"{os.cpu_count()} CPU cores"
  )
  limits = hardware.measure_limits(512, 32 * 2**20) if args.quick else hardware.measure_limits()
  print(
    f"measured peak: {limits['peak_flops'] / 1e9:.1f} GFLOP/s (f32 {limits['matmul_n']}^2 "
    f"matmul); bandwidth {limits['peak_bytes_per_s'] / 1e9:.1f} GB/s"
  )
  results = []
  for preset in args.presets:
    print(f"{preset}: compiling and timing {args.steps} steps ...", flush=True)
    results.append(run_preset(preset, args.steps, limits, args.seed))
  print()
  table = hardware.print_table(results, TABLE)
  print(
    "compile_s = first call - median step; tokens = batch x (inputs + targets); gflop_xla from "
    "XLA's cost analysis, gflop_6nt = 6 x params x tokens through them; pct_peak = "
    "gflops_per_s / measured peak matmul FLOP/s."
  )
  path = hardware.write_json(
    args.out,
    {
      "benchmark": "train_step",
      "quick": args.quick,
      "steps": args.steps,
      "optimizer": "adafactor (modjax.train.defaults)",
      "machine": hardware.machine(),
      "limits": limits,
      "results": results,
      "table": table,
    },
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
