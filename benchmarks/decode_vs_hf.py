"""Decoding throughput: modjax (jitted while_loop) vs transformers (PyTorch) ``generate``, on CPU.

One T5 with t5-small's shapes (vocab 32128, d_model 512, d_ff 2048, 8 heads of 64, 6+6 layers,
ReLU) is initialised by transformers under ``torch.manual_seed``, written with
``save_pretrained`` and imported by ``modjax.interop.hf``: both sides run the same weights on the
same random encoder inputs (no padding). Both generate exactly ``--new-tokens`` tokens: HF with
``eos_token_id=None``, modjax with ``eos_id=-1`` (an id no token has), so neither stops early,
for greedy and beam search alike; the tokens each side really generated are reported, as is
whether their outputs agree.

Throughput is generated tokens per second, batch * new tokens / seconds, the median of
``--repeats`` timed calls after one warm-up call; modjax's compile time is its first call minus
that median. modjax lays the weights out for decoding once (``decode.prepare``: the tied head
transposed), as HF's are laid out at load; that time is reported as ``modjax_prepare_s``. The
machine's limits (peak float32 matmul FLOP/s, memory bandwidth) are measured in the same run
with ``benchmarks/hardware.py``; modjax's achieved FLOP/s and bandwidth are quoted against them,
from XLA's cost analysis of its compiled prefill and decode step and from the bytes a step must
read (decoder weights once, the KV caches).

Run from the repository root:

    python -m benchmarks.decode_vs_hf                       # full run, several minutes on CPU
    python -m benchmarks.decode_vs_hf --quick               # tiny model: a smoke test
    python -m benchmarks.decode_vs_hf --batch-sizes 1,8 --new-tokens 64 --repeats 3 \\
        --out benchmarks/results/decode_vs_hf.json

On a shared machine the numbers are noisy: compare ratios from one run, not across runs. Both
frameworks use ``--threads`` threads (default: every core). When another process keeps a core
busy, all-core threading oversubscribes: with 2 cores and one busy, PyTorch with 2 threads ran
about 5x slower than with 1 in our runs (XLA suffered less), so also run ``--threads 1`` there.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from modjax.decode import generate, prepare
from modjax.interop.hf import import_checkpoint
from modjax.layers import add_beam_slots
from modjax.models import architecture_for

try:
  from benchmarks import hardware
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
  import hardware

T5_SMALL = dict(
  vocab_size=32128,
  d_model=512,
  d_kv=64,
  d_ff=2048,
  num_heads=8,
  num_layers=6,
  num_decoder_layers=6,
  feed_forward_proj="relu",
)
TINY = dict(
  vocab_size=512,
  d_model=64,
  d_kv=16,
  d_ff=128,
  num_heads=4,
  num_layers=2,
  num_decoder_layers=2,
  feed_forward_proj="relu",
)
NEVER = -1  # an EOS id no token has: modjax always generates max_new_tokens


def build(shape: dict, seed: int, directory: str):
  """(HF model, modjax model, modjax params on device) holding the same random weights."""
  transformers.logging.set_verbosity_error()
  torch.manual_seed(seed)
  config = transformers.T5Config(**shape, dropout_rate=0.0, decoder_start_token_id=0)
  hf = transformers.T5ForConditionalGeneration(config).float().eval()
  hf.save_pretrained(directory)
  config, params = import_checkpoint(directory)
  return hf, architecture_for(config), jax.device_put(params)


def xla_costs(model, params, batch: int, beams: int, input_length: int, new: int) -> dict:
  """XLA's FLOPs and bytes accessed for the prefill (encoder + first step, once per input row)
  and one decode step of batch * beams rows (with beam search's ancestry mask over beam slots).
  The per-step bookkeeping over scores (top-k of k*V candidates) is not counted."""
  plan = model.identity_plan()
  ids = jax.ShapeDtypeStruct((batch, input_length), jnp.int32)

  def start(p, ids, mask):
    return model.start_decoding(p, plan, ids, mask, new)

  def step(p, cache, tok, index, ancestry):
    if beams > 1:
      cache = dict(
        cache,
        self=tuple(add_beam_slots(layer, beams) for layer in cache["self"]),
        ancestry=ancestry,
      )
    return model.decode_step(p, plan, cache, tok, index)

  cache, _, _ = jax.eval_shape(start, params, ids, ids)
  tok = jax.ShapeDtypeStruct((batch * beams,), jnp.int32)
  index = jax.ShapeDtypeStruct((), jnp.int32)
  ancestry = jax.ShapeDtypeStruct((batch, beams, new), jnp.int32)
  out = {}
  for name, fn, args in (
    ("prefill", start, (params, ids, ids)),
    ("step", step, (params, cache, tok, index, ancestry)),
  ):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    out[name] = {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost["bytes accessed"])}
  return out


def step_bytes(config, batch: int, beams: int, input_length: int, new: int) -> dict:
  """Bytes one decode step must read: decoder weights once (the tied embedding as LM head) and
  the KV caches (a fixed length ``new`` per beam; cross k/v once per input row)."""
  c = config
  d, hk, layers = c.d_model, c.num_heads * c.d_kv, c.num_decoder_layers
  ffn = (3 if c.is_gated else 2) * d * c.d_ff
  per_layer = 2 * d * hk + 2 * d * hk + ffn + 3 * d  # self q,k,v,o minus k,v of cross; q,o of cross
  weights = 4 * (layers * per_layer + c.vocab_size * d)
  self_kv = 4 * 2 * layers * batch * beams * new * hk
  cross_kv = 4 * 2 * layers * batch * input_length * hk
  return {"weights": weights, "kv_cache": self_kv + cross_kv}


def useful_flops(config, batch: int, beams: int, input_length: int, new: int) -> float:
  """Matmul and attention FLOPs of one generate call with a growing cache (no padding waste):
  the encoder and cross k/v once per input row, the decoder once per beam and token."""
  c = config
  d, hk, s = c.d_model, c.num_heads * c.d_kv, input_length
  ffn = (3 if c.is_gated else 2) * d * c.d_ff
  encoder = c.num_layers * s * (2 * (4 * d * hk + ffn) + 4 * hk * s)
  cross_kv = c.num_decoder_layers * s * 2 * 2 * d * hk
  per_token = c.num_decoder_layers * 2 * (6 * d * hk + ffn) + 2 * d * c.vocab_size
  attention = c.num_decoder_layers * sum(4 * hk * (t + 1) + 4 * hk * s for t in range(new))
  return float(batch * (encoder + cross_kv) + batch * beams * (new * per_token + attention))


def run_case(
  hf,
  model,
  params,
  prepared,
  batch: int,
  beams: int,
  input_length: int,
  new: int,
  repeats: int,
  limits: dict,
  seed: int,
) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, model.config.vocab_size, size=(batch, input_length)).astype(np.int32)
  mask = np.ones_like(ids)
  plan = model.identity_plan()
  ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
  ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

  def run_modjax():
    return generate(
      model,
      params,
      plan,
      ids_j,
      mask_j,
      max_new_tokens=new,
      num_beams=beams,
      eos_id=NEVER,
      prepared=prepared,
    )

  def run_hf():
    with torch.inference_mode():
      return hf.generate(
        input_ids=ids_t,
        attention_mask=mask_t,
        max_new_tokens=new,
        num_beams=beams,
        do_sample=False,
        eos_token_id=None,
      )

  start = time.perf_counter()
  mj_out = hardware.block(run_modjax())
  mj_first = time.perf_counter() - start
  mj_s = hardware.median(hardware.time_calls(run_modjax, repeats, warmup=0))
  hardware.settle()  # XLA's spinning threads would slow the PyTorch calls
  start = time.perf_counter()
  hf_out = run_hf()
  hf_first = time.perf_counter() - start
  hf_s = hardware.median(hardware.time_calls(run_hf, repeats, warmup=0))
  hardware.settle()

  mj_tokens, hf_tokens = np.asarray(mj_out.tokens), hf_out.numpy()[:, 1:]
  same = [np.array_equal(a, b) for a, b in zip(mj_tokens, hf_tokens, strict=True)]
  c = model.config
  costs = xla_costs(model, params, batch, beams, input_length, new)
  xla_flops = costs["prefill"]["flops"] + (new - 1) * costs["step"]["flops"]
  moved = step_bytes(c, batch, beams, input_length, new)
  per_step = moved["weights"] + moved["kv_cache"]
  peak_bw = limits["peak_bytes_per_s"]
  return {
    "batch": batch,
    "beams": beams,
    "new_tokens_modjax": int(np.min(np.asarray(mj_out.lengths))),
    "new_tokens_hf": int(hf_tokens.shape[1]),
    "rows_equal": f"{sum(same)}/{batch}",
    "modjax_tok_s": batch * new / mj_s,
    "hf_tok_s": batch * new / hf_s,
    "ratio": hf_s / mj_s,
    "modjax_s": mj_s,
    "hf_s": hf_s,
    "modjax_compile_s": mj_first - mj_s,
    "hf_first_call_s": hf_first,
    "modjax_ms_per_step": 1e3 * mj_s / new,
    "xla_gflop_prefill": costs["prefill"]["flops"] / 1e9,
    "xla_gflop_step": costs["step"]["flops"] / 1e9,
    "xla_mb_step": costs["step"]["bytes"] / 1e6,
    "useful_gflop": useful_flops(c, batch, beams, input_length, new) / 1e9,
    "mb_step": per_step / 1e6,
    "mb_step_weights": moved["weights"] / 1e6,
    "mb_step_kv": moved["kv_cache"] / 1e6,
    "modjax_gflop_s": xla_flops / mj_s / 1e9,
    "modjax_pct_peak_flops": 100 * xla_flops / mj_s / limits["peak_flops"],
    "hf_useful_gflop_s": useful_flops(c, batch, beams, input_length, new) / hf_s / 1e9,
    "modjax_gb_s": per_step * new / mj_s / 1e9,
    "modjax_pct_peak_bw": 100 * per_step * new / mj_s / peak_bw,
  }


TABLE = [
  "batch",
  "beams",
  "new_tokens_modjax",
  "new_tokens_hf",
  "rows_equal",
  "modjax_tok_s",
  "hf_tok_s",
  "ratio",
  "modjax_compile_s",
  "modjax_ms_per_step",
  "xla_gflop_step",
  "modjax_gflop_s",
  "modjax_pct_peak_flops",
  "mb_step",
  "modjax_gb_s",
  "modjax_pct_peak_bw",
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8; quick 1,2)")
  p.add_argument("--beams", default="1,4", help="comma-separated beam counts (1 = greedy)")
  p.add_argument("--new-tokens", type=int, default=None, help="default 64; quick 8")
  p.add_argument("--input-length", type=int, default=None, help="default 64; quick 16")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 3)")
  p.add_argument(
    "--threads",
    type=int,
    default=os.cpu_count(),
    help="CPU threads of both frameworks (default: all cores): torch.set_num_threads, and for\n"
    "fewer than all cores XLA's intra_op_parallelism_threads (set before JAX starts)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "decode_vs_hf.json"))
  p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test")
  args = p.parse_args(argv)
  quick = args.quick
  args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if quick else "1,8")).split(",")]
  args.beams = [int(b) for b in args.beams.split(",")]
  args.new_tokens = args.new_tokens or (8 if quick else 64)
  args.input_length = args.input_length or (16 if quick else 64)
  args.repeats = args.repeats or (1 if quick else 3)
  return args


def limit_xla_threads(threads: int):
  """Caps XLA's CPU thread pool; effective only before JAX initialises its backend."""
  if threads >= (os.cpu_count() or 1):
    return
  flags = [
    f"--xla_cpu_multi_thread_eigen={'false' if threads == 1 else 'true'}",
    f"intra_op_parallelism_threads={threads}",
  ]
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def main(argv=None):
  args = parse_args(argv)
  limit_xla_threads(args.threads)
  torch.set_num_threads(args.threads)
  xla_threads = min(args.threads, os.cpu_count() or 1)
  print(
    f"threads: torch {torch.get_num_threads()}, XLA {xla_threads} (of {os.cpu_count()} "
    f"cores). JAX {jax.__version__} on {jax.default_backend()}, torch {torch.__version__}, "
    f"transformers {transformers.__version__}"
  )
  limits = hardware.measure_limits(512, 32 * 2**20) if args.quick else hardware.measure_limits()
  hardware.settle()
  print(
    f"measured peak: {limits['peak_flops'] / 1e9:.1f} GFLOP/s (f32 {limits['matmul_n']}^2 "
    f"matmul); bandwidth: read {limits['read_bytes_per_s'] / 1e9:.1f} GB/s, "
    f"copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s"
  )
  shape = TINY if args.quick else T5_SMALL
  with tempfile.TemporaryDirectory() as directory:
    hf, model, params = build(shape, args.seed, directory)
  # The weights laid out for decoding once (the tied head transposed), as HF's are at load time.
  start = time.perf_counter()
  prepared = hardware.block(prepare(model, params))
  prepare_s = time.perf_counter() - start
  results = []
  for batch in args.batch_sizes:
    for beams in args.beams:
      print(f"batch {batch}, beams {beams} ...", flush=True)
      results.append(
        run_case(
          hf,
          model,
          params,
          prepared,
          batch,
          beams,
          args.input_length,
          args.new_tokens,
          args.repeats,
          limits,
          args.seed,
        )
      )
  print()
  table = hardware.print_table(results, TABLE)
  print(
    "ratio = modjax tok/s / HF tok/s; %peak against this run's measured limits; "
    "mb_step = decoder weights + KV caches read per step; peak bandwidth = the better of "
    "read and copy."
  )
  path = hardware.write_json(
    args.out,
    {
      "benchmark": "decode_vs_hf",
      "model": shape,
      "quick": args.quick,
      "input_length": args.input_length,
      "new_tokens": args.new_tokens,
      "repeats": args.repeats,
      "torch_threads": torch.get_num_threads(),
      "xla_threads": xla_threads,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "machine": hardware.machine(),
      "limits": limits,
      "modjax_prepare_s": prepare_s,
      "versions": {
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
      },
      "results": results,
      "table": table,
    },
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
