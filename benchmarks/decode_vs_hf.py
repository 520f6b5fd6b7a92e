"""Decoding throughput: modjax (jitted while_loop) vs transformers (PyTorch) ``generate``, on CPU.

One T5 with t5-small's shapes (vocab 32128, d_model 512, d_ff 2048, 8 heads of 64, 6+6 layers,
ReLU) is initialised by transformers under ``torch.manual_seed``, written with
``save_pretrained`` and imported by ``modjax.store.hf``: both sides run the same weights on the
same random encoder inputs (no padding). Both generate exactly ``--new-tokens`` tokens: HF with
``eos_token_id=None``, modjax with ``eos_id=-1`` (an id no token has), so neither stops early,
for greedy and beam search alike; the tokens each side really generated are reported, as is
whether their outputs agree.

Throughput is generated tokens per second, batch * new tokens / seconds, the median of
``--repeats`` interleaved rounds (modjax, HF, modjax, HF, ... with a pause after each call, as
``benchmarks/harness.py`` times) after one warm-up call each; modjax's compile time is its first
call minus that median. modjax lays the weights out for decoding once (``decoding.prepare``: the
tied head transposed), as HF's are laid out at load; that time is reported as
``modjax_prepare_s``. The machine's limits (peak float32 matmul FLOP/s, memory bandwidth) are
measured in the same run, before and after the cases (the better counts); modjax's achieved
FLOP/s and bandwidth are quoted against them, from XLA's cost analysis of its compiled prefill
and decode step and from the bytes a step must read (decoder weights once, the KV caches).

Run from the repository root:

    python -m benchmarks.decode_vs_hf                       # full run, several minutes on CPU
    python -m benchmarks.decode_vs_hf --quick               # tiny model: a smoke test
    python -m benchmarks.decode_vs_hf --batch-sizes 1,8 --new-tokens 64 --repeats 5 \\
        --out benchmarks/results/decode_vs_hf.json

Both frameworks use ``--threads`` threads (default: every core). When another process keeps a core
busy, all-core threading oversubscribes: with 2 cores and one busy, PyTorch with 2 threads ran
about 5x slower than with 1 in our runs (XLA suffered less), so also run ``--threads 1`` there.
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from benchmarks import harness
from modjax.core import timing
from modjax.decoding import generate, prepare
from modjax.models import architecture_for
from modjax.nn.layers import add_beam_slots
from modjax.store.hf import import_checkpoint

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
    out[name] = harness.xla_cost(jax.jit(fn), *args)
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


def run_case(hf, model, params, prepared, batch: int, beams: int, args) -> dict:
  """One (batch, beams) case: both sides timed interleaved, outputs compared, XLA's and the
  model's costs; the percentages of the ceilings come later (:func:`add_percentages`)."""
  input_length, new = args.input_length, args.new_tokens
  rng = np.random.default_rng(args.seed)
  ids = rng.integers(2, model.config.vocab_size, size=(batch, input_length)).astype(np.int32)
  mask = np.ones_like(ids)
  plan = model.identity_plan()
  ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
  ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
  kw = dict(max_new_tokens=new, num_beams=beams)

  def run_modjax():
    return generate(model, params, plan, ids_j, mask_j, **kw, eos_id=NEVER, prepared=prepared)

  def run_hf():
    with torch.inference_mode():
      return hf.generate(
        input_ids=ids_t, attention_mask=mask_t, **kw, do_sample=False, eos_token_id=None
      )

  mj_out, mj_first = timing.timed(run_modjax)
  harness.settle()  # XLA's spinning threads would slow the PyTorch calls
  hf_out, hf_first = timing.timed(run_hf)
  harness.settle()
  seconds = harness.interleaved({"modjax": run_modjax, "hf": run_hf}, args.repeats, pause=2.0)
  mj_s, hf_s = harness.median(seconds["modjax"]), harness.median(seconds["hf"])

  mj_tokens, hf_tokens = np.asarray(mj_out.tokens), hf_out.numpy()[:, 1:]
  same = [np.array_equal(a, b) for a, b in zip(mj_tokens, hf_tokens, strict=True)]
  c = model.config
  costs = xla_costs(model, params, batch, beams, input_length, new)
  xla_flops = costs["prefill"]["flops"] + (new - 1) * costs["step"]["flops"]
  moved = step_bytes(c, batch, beams, input_length, new)
  per_step = moved["weights"] + moved["kv_cache"]
  useful = useful_flops(c, batch, beams, input_length, new)
  row = {"batch": batch, "beams": beams}
  row["new_tokens_modjax"] = int(np.min(np.asarray(mj_out.lengths)))
  row |= {"new_tokens_hf": int(hf_tokens.shape[1]), "rows_equal": f"{sum(same)}/{batch}"}
  row |= {"modjax_tok_s": batch * new / mj_s, "hf_tok_s": batch * new / hf_s}
  row |= {"ratio": hf_s / mj_s, "modjax_s": mj_s, "hf_s": hf_s}
  row |= {"modjax_compile_s": mj_first - mj_s, "hf_first_call_s": hf_first}
  row["modjax_ms_per_step"] = 1e3 * mj_s / new
  row["xla_gflop_prefill"] = costs["prefill"]["flops"] / 1e9
  row["xla_gflop_step"] = costs["step"]["flops"] / 1e9
  row["xla_mb_step"] = costs["step"]["bytes"] / 1e6
  row |= {"useful_gflop": useful / 1e9, "mb_step": per_step / 1e6}
  row |= {"mb_step_weights": moved["weights"] / 1e6, "mb_step_kv": moved["kv_cache"] / 1e6}
  row |= {"modjax_gflop_s": xla_flops / mj_s / 1e9, "hf_useful_gflop_s": useful / hf_s / 1e9}
  return row | {"modjax_gb_s": per_step * new / mj_s / 1e9}


def add_percentages(row: dict, limits: dict) -> dict:
  """modjax's achieved FLOP/s and bandwidth as percentages of this run's ceilings."""
  row["modjax_pct_peak_flops"] = 100 * row["modjax_gflop_s"] * 1e9 / limits["peak_flops"]
  row["modjax_pct_peak_bw"] = 100 * row["modjax_gb_s"] * 1e9 / limits["peak_bytes_per_s"]
  return row


TABLE = "batch beams new_tokens_modjax new_tokens_hf rows_equal modjax_tok_s hf_tok_s ratio"
TABLE += " modjax_compile_s modjax_ms_per_step xla_gflop_step modjax_gflop_s modjax_pct_peak_flops"
TABLE += " mb_step modjax_gb_s modjax_pct_peak_bw"


def parse_args(argv=None):
  p = harness.parser(__doc__, "decode_vs_hf")
  p.add_argument("--batch-sizes", type=harness.ints, help="comma-separated (1,8; quick 1,2)")
  p.add_argument("--beams", type=harness.ints, default=[1, 4], help="beam counts (1 = greedy)")
  p.add_argument("--new-tokens", type=int, default=None, help="default 64; quick 8")
  p.add_argument("--input-length", type=int, default=None, help="default 64; quick 16")
  p.add_argument("--repeats", type=int, default=None, help="timed rounds per case (5; quick 1)")
  p.add_argument(
    "--threads",
    type=int,
    default=os.cpu_count(),
    help="CPU threads of both frameworks (default: all cores): torch.set_num_threads, and for\n"
    "fewer than all cores XLA's intra_op_parallelism_threads (set before JAX starts)",
  )
  args = p.parse_args(argv)
  harness.defaults(args, batch_sizes=([1, 2], [1, 8]), new_tokens=(8, 64), repeats=(1, 5))
  return harness.defaults(args, input_length=(16, 64))


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
  shape = TINY if args.quick else T5_SMALL
  with tempfile.TemporaryDirectory() as directory:
    hf, model, params = build(shape, args.seed, directory)
  # The weights laid out for decoding once (the tied head transposed), as HF's are at load time.
  prepared, prepare_s = timing.timed(lambda: prepare(model, params))

  def run():
    results = []
    for batch in args.batch_sizes:
      for beams in args.beams:
        harness.say(f"batch {batch}, beams {beams} ...")
        results.append(run_case(hf, model, params, prepared, batch, beams, args))
    return results

  results, limits = harness.around(args.quick, run)
  results = [add_percentages(row, limits) for row in results]
  table = harness.table(results, TABLE)
  print(
    "ratio = modjax tok/s / HF tok/s; %peak against this run's measured limits; "
    "mb_step = decoder weights + KV caches read per step; peak bandwidth = the better of "
    "read and copy."
  )
  harness.report(
    args,
    "decode_vs_hf",
    "input_length new_tokens repeats",
    model=shape,
    torch_threads=torch.get_num_threads(),
    xla_threads=xla_threads,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    limits=limits,
    modjax_prepare_s=prepare_s,
    versions={
      "jax": jax.__version__,
      "torch": torch.__version__,
      "transformers": transformers.__version__,
    },
    results=results,
    table=table,
  )


if __name__ == "__main__":
  main()
