"""Decoding throughput: modjax (jitted while_loop) vs transformers (PyTorch) ``generate``, on CPU.

Per shape (``--shapes``: ``t5-small``, vocabulary 32128; ``ddtp``, the 6+6-layer d_model 256
DDTP-summ teacher with its 4k vocabulary; ``micro`` for ``--quick``), one T5 is initialised by
transformers under ``torch.manual_seed``, written with ``save_pretrained`` and imported by
``modjax.store.hf``: both sides run the same weights on the same random inputs (no padding) and
generate exactly ``--new-tokens`` tokens (HF ``eos_token_id=None``, modjax ``eos_id=-1``), greedy
and beam search alike; the tokens generated and whether the outputs agree are reported.

Tokens/s is batch x new tokens / the median of ``--repeats`` interleaved rounds (a pause after
each call); modjax's compile time is its first call minus that median; its weights are laid out
once (``decoding.prepare``, reported apart), as HF's are at load. The work: FLOPs of the call with
a growing cache and the bytes a step must read (decoder weights, KV caches), from
``modjax.models.cost``; XLA's cost analysis of the compiled prefill and step beside them.
``fraction_of_roofline`` = the roofline's time for that work over modjax's, against the ceilings
measured in the same run.

    python -m benchmarks.decode_vs_hf                       # full run, several minutes on CPU
    python -m benchmarks.decode_vs_hf --quick               # micro model: a smoke test

Both frameworks use ``--threads`` threads (default: every core). When another process keeps a core
busy, all-core threading oversubscribes (PyTorch with 2 threads ran ~5x slower than with 1 with
one of 2 cores busy), so also run ``--threads 1`` there.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from benchmarks import harness
from modjax.core import timing
from modjax.core.presets import get_preset
from modjax.decoding import generate, prepare
from modjax.models import architecture_for, cost
from modjax.nn.layers import add_beam_slots
from modjax.store.hf import import_checkpoint

# shape -> (preset, overrides): the DDTP teacher is configs/ddtp_summ.py's (6 layers, 4k vocabulary)
SHAPES = {
  "micro": ("micro", {}),
  "t5-small": ("t5-small", dict(vocab_size=32128)),
  "ddtp": ("small-cpu-6", dict(vocab_size=4000)),
}
NEVER = -1  # an EOS id no token has: modjax always generates max_new_tokens


def build(shape: str, seed: int, directory: str):
  """(HF model, modjax model, modjax params on device) holding the same random weights."""
  preset, overrides = SHAPES[shape]
  config = harness.hf_t5_config(dataclasses.replace(get_preset(preset), **overrides))
  transformers.logging.set_verbosity_error()
  torch.manual_seed(seed)
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
      slots = tuple(add_beam_slots(layer, beams) for layer in cache["self"])
      cache = dict(cache, self=slots, ancestry=ancestry)
    return model.decode_step(p, plan, cache, tok, index)

  cache, _, _ = jax.eval_shape(start, params, ids, ids)
  shapes = [((batch * beams,), jnp.int32), ((), jnp.int32), ((batch, beams, new), jnp.int32)]
  step_args = [jax.ShapeDtypeStruct(*shape) for shape in shapes]
  prefill = harness.xla_cost(jax.jit(start), params, ids, ids)
  return {"prefill": prefill, "step": harness.xla_cost(jax.jit(step), params, cache, *step_args)}


def model_work(model, batch: int, beams: int, input_length: int, new: int) -> dict:
  """FLOPs of one generate call with a growing cache (the encoder and cross k/v once per input
  row, each decode step scoring only the positions written) and the bytes one step reads."""
  c = cost.plan_cost(
    model, model.identity_plan(), batch=batch, input_length=input_length, target_length=new,
    beams=beams,
  )  # fmt: skip
  flops = c.prefill_flops + sum(c.decode_step_flops(t + 1) for t in range(new))
  return {"flops": flops, "step_bytes": c.decode_step_bytes(), "kv_bytes": c.kv_cache_bytes()}


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
  costs = xla_costs(model, params, batch, beams, input_length, new)
  work = model_work(model, batch, beams, input_length, new)
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
  row |= {"gflop": work["flops"] / 1e9, "mb_step": work["step_bytes"] / 1e6}
  row["mb_step_kv"] = work["kv_bytes"] / 1e6
  return row | {"modjax_gflop_s": work["flops"] / mj_s / 1e9}


def add_percentages(row: dict, limits: dict) -> dict:
  """modjax's call against this run's ceilings (``harness.roofline``)."""
  work = (row["gflop"] * 1e9, row["mb_step"] * 1e6 * row["new_tokens_modjax"], row["modjax_s"])
  return row | {f"modjax_{k}": v for k, v in harness.roofline(*work, limits).items()}


TABLE = "shape batch beams new_tokens_modjax new_tokens_hf rows_equal modjax_tok_s hf_tok_s ratio"
TABLE += " modjax_compile_s modjax_ms_per_step gflop modjax_pct_peak_flops mb_step"
TABLE += " modjax_pct_peak_bw modjax_fraction_of_roofline"


def parse_args(argv=None):
  p = harness.parser(__doc__, "decode_vs_hf")
  p.option("--shapes", "micro", "t5-small,ddtp", str, f"comma-separated, of {sorted(SHAPES)}")
  p.option("--batch-sizes", [1, 2], [1, 8], harness.ints)
  p.add_argument("--beams", type=harness.ints, default=[1, 4], help="beam counts (1 = greedy)")
  p.option("--new-tokens", 8, 64)
  p.option("--input-length", 16, 64)
  p.option("--repeats", 1, 5, help="timed rounds per case")
  p.add_argument(
    "--threads", type=int, default=os.cpu_count(),
    help="CPU threads of both frameworks (default: all cores): torch.set_num_threads, and for\n"
    "fewer than all cores XLA's intra_op_parallelism_threads (set before JAX starts)",
  )  # fmt: skip
  args = p.parse_args(argv)
  args.shapes = args.shapes.split(",")
  if unknown := sorted(set(args.shapes) - set(SHAPES)):
    p.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
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
  print(f"threads: torch {torch.get_num_threads()}, XLA {xla_threads} of {os.cpu_count()} cores")
  prepare_s = {}

  def run():
    results = []
    for shape in args.shapes:
      with tempfile.TemporaryDirectory() as directory:
        hf, model, params = build(shape, args.seed, directory)
      # The weights laid out for decoding once (the tied head transposed), as HF's are at load.
      prepared, prepare_s[shape] = timing.timed(functools.partial(prepare, model, params))
      for batch in args.batch_sizes:
        for beams in args.beams:
          harness.say(f"{shape}: batch {batch}, beams {beams} ...")
          row = run_case(hf, model, params, prepared, batch, beams, args)
          results.append({"shape": shape} | row)
    return results

  results, limits = harness.around(args.quick, run)
  results = [add_percentages(row, limits) for row in results]
  table = harness.table(results, TABLE)
  print(
    "ratio = modjax tok/s / HF tok/s; %peak against this run's measured limits; "
    "mb_step = decoder weights + KV caches read per step; fraction_of_roofline = the "
    "roofline's time for the call's FLOPs and bytes over modjax's."
  )
  out = {"models": {shape: SHAPES[shape] for shape in args.shapes}, "limits": limits}
  out |= {"torch_threads": torch.get_num_threads(), "xla_threads": xla_threads}
  out |= {"xla_flags": os.environ.get("XLA_FLAGS", ""), "modjax_prepare_s": prepare_s}
  harness.report(
    args, "shapes input_length new_tokens repeats", **out, results=results, table=table
  )


if __name__ == "__main__":
  main()
