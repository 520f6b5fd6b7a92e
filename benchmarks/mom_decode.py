"""Mixture-of-Modules decoding: a decode step whose cost follows K, not the pool size.

For pools of N = N_A = N_F modules (``--pools``; the rest from ``configs/mom_gpt2.py:<size>``) and
B decode rows (``--batches``), three sides with the same weights: ``exact`` (what
``modjax.decoding`` runs: a step's B*K (row, slot) pairs gather their modules' weights while
B*K < N, else every module runs), ``dense`` (every module every step, the routing weights mask)
and ``vanilla`` (GPT-2 of the same parameters). Per side: XLA's FLOPs and bytes of one compiled
decode step, and cached greedy ``generate`` of exactly ``--new-tokens`` tokens per row after a
``--prompt-length`` prompt (median of ``--calls``, prefill included): ``tokens_per_s``,
``ms_per_step``, ``vs_vanilla`` and ``pct_bw`` (XLA's bytes per step over its time against the
same run's bandwidth; XLA counts every operand as traffic, gathered copies that stay in cache
included, so over 100% overstates the traffic).

    python -m benchmarks.mom_decode                  # ddtp, pools 4,8,16, rows 1,4,16
    python -m benchmarks.mom_decode --quick          # tiny shapes: a smoke test
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, mom
from modjax import decoding
from modjax.core import timing
from modjax.methods.mom import MoMGPT2
from modjax.methods.mom.dispatch import exact_kind

NEVER = -1  # an eos id no token has: every row decodes exactly --new-tokens tokens

TABLE = "pool batch side dispatch params_m mflop_per_step mb_per_step ms_per_step tokens_per_s"
TABLE += " vs_vanilla pct_bw"


def step_cost(model, params, rows: int, args) -> dict:
  """XLA's FLOPs and bytes accessed of one compiled decode step of ``rows`` rows."""
  plan = model.identity_plan()
  prompt = jnp.ones((rows, args.prompt_length), jnp.int32)
  mask = jnp.ones_like(prompt)
  cache, _, index = model.start_decoding(params, plan, prompt, mask, args.new_tokens)
  step = jax.jit(model.decode_step, static_argnums=1)
  cost = harness.xla_cost(step, params, plan, cache, prompt[:, 0], index)
  return {"mflop_per_step": cost["flops"] / 1e6, "mb_per_step": cost["bytes"] / 1e6}


def decode_side(model, params, rows: int, args, seed: int) -> harness.Side:
  """Cached greedy decoding of exactly ``--new-tokens`` tokens per row (compiled, then timed)."""
  vocab = model.config.vocab_size
  prompt = np.random.default_rng(seed).integers(2, vocab, (rows, args.prompt_length), np.int32)
  prompt = jnp.asarray(prompt)
  prepared = decoding.prepare(model, params)
  plan = model.identity_plan()

  def call():
    out = decoding.generate(
      model, params, plan, prompt, max_new_tokens=args.new_tokens, eos_id=NEVER, pad_id=0,
      prepared=prepared,
    )  # fmt: skip
    return out.lengths

  lengths, first_s = timing.timed(call)  # compiles
  lengths = np.asarray(lengths)
  assert (lengths == args.new_tokens).all(), f"decoded lengths {lengths}, not {args.new_tokens}"
  is_mom = isinstance(model, MoMGPT2)
  row = {"part": "decode", "model": "mom" if is_mom else "vanilla"}
  row |= {"dispatch": exact_dispatch(model, rows) if is_mom else "-", "batch": rows}
  row |= {"prompt": args.prompt_length, "new_tokens": args.new_tokens}
  row |= {"tokens": rows * args.new_tokens, "params_m": harness.count_params(params) / 1e6}
  return harness.Side(f"decode {row['model']} {rows}", call, row, first_s=first_s)


def exact_dispatch(model: MoMGPT2, rows: int) -> str:
  """What a decode step of ``rows`` rows runs: ``exact (gather)`` or ``exact (dense)``."""
  mom = model.exact().mom
  if mom.dispatch != "exact":
    return mom.dispatch
  kinds = {exact_kind(rows * mom.top_k, n) for n in (mom.num_attn, mom.num_ffn)}
  return f"exact ({'/'.join(sorted(kinds))})"


def pool_sides(setup, pool: int, rows: int, args) -> list:
  """The vanilla, dense and exact sides of one pool size and row count."""
  pooled = dataclasses.replace(
    setup, mom=dataclasses.replace(setup.mom, num_attn=pool, num_ffn=pool)
  )
  vanilla_params, mom_params = mom.start_params(pooled, args.seed)
  models = [
    ("vanilla", mom.vanilla_of(mom.mom_model(pooled)), vanilla_params),
    ("dense", mom.mom_model(pooled, dispatch="dense"), mom_params),
    ("exact", mom.mom_model(pooled, dispatch="exact"), mom_params),
  ]
  sides = []
  for name, model, params in models:
    side = decode_side(model, params, rows, args, args.seed)
    side.row |= {"pool": pool, "side": name, **step_cost(model, params, rows, args)}
    sides.append(side)
  return sides


def finish(sides: list, args, peak_bytes_per_s: float) -> list[dict]:
  rows = []
  for side in sides:
    call_s = harness.median(side.seconds)
    row = dict(side.row, call_ms_all=[1e3 * s for s in side.seconds])
    row["ms_per_step"] = 1e3 * call_s / args.new_tokens
    row["tokens_per_s"] = row["tokens"] / call_s
    row["pct_bw"] = 100 * row["mb_per_step"] * 1e6 / (row["ms_per_step"] / 1e3) / peak_bytes_per_s
    rows.append(row)
  vanilla = {(r["pool"], r["batch"]): r["tokens_per_s"] for r in rows if r["side"] == "vanilla"}
  for row in rows:
    row["vs_vanilla"] = row["tokens_per_s"] / vanilla[row["pool"], row["batch"]]
  return rows


def parse_args(argv=None):
  p = harness.parser(__doc__, "mom_decode")
  p.option("--size", "tiny", "ddtp", str, "configs/mom_gpt2.py size")
  p.option("--pools", [4, 8], [4, 8, 16], harness.ints, "pool sizes N_A = N_F")
  p.option("--batches", [1], [1, 4, 16], harness.ints, "decode rows")
  p.option("--prompt-length", 8, 32, help="prompt tokens")
  p.option("--new-tokens", 8, 64, help="new tokens per row")
  p.option("--calls", 2, 6, help="timed generate calls per side")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  setup = mom.load_setup(args.size, None)
  print(f"{args.size}: {setup.mom}", flush=True)

  def run():
    sides = []
    for pool in args.pools:
      for rows in args.batches:
        sides += pool_sides(setup, pool, rows, args)
        harness.say(f"pool {pool}, {rows} rows: compiled and cost-analysed")
    rounds = min(3, args.calls)
    harness.time_sides(sides, rounds, calls=max(1, args.calls // rounds))
    return sides

  sides, limits = harness.around(args.quick, run)
  rows = finish(sides, args, limits["peak_bytes_per_s"])
  table = harness.table(rows, TABLE)
  keys = "size pools batches prompt_length new_tokens calls"
  harness.report(args, keys, mom=setup.mom.to_dict(), limits=limits, results=rows, table=table)


if __name__ == "__main__":
  main()
