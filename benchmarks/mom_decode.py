"""Mixture-of-Modules decoding: a decode step whose cost follows K, not the pool size.

For pools of N = N_A = N_F modules (``--pools``; K, H and the rest from
``configs/mom_gpt2.py:<size>``, ``ddtp`` by default: K=1, H=4, one MoM block, d 256) and B
decode rows (``--batches``), three sides with the same weights (the MoM pools mapped from the
vanilla model's layers, as phase two starts):

* ``exact``: what ``modjax.decoding`` runs (``MoMGPT2.exact()``): a step's B*K (row, slot) pairs
  gather just their modules' weights while B*K < N, else every module runs;
* ``dense``: every module of the pool runs every step and the routing weights mask (the
  reference, what MoM decoding did before ``exact``);
* ``vanilla``: GPT-2 of the same parameters (``vanilla_depth`` layers, so it deepens with N).

Per side: XLA's cost analysis of one compiled decode step (``decode_step`` after a prefilled
prompt): ``mflop_per_step`` and ``mb_per_step`` (bytes accessed); and cached greedy
``modjax.decoding.generate`` of ``--new-tokens`` tokens per row after a ``--prompt-length`` prompt
(median of ``--calls`` calls, prefill included): ``tokens_per_s`` and ``ms_per_step`` (median
call / new tokens). ``pct_bw`` = bytes per step / ms per step / the peak memory bandwidth
measured in the same run (``benchmarks/harness.py``): a step at these sizes reads its weights
once per step, so bandwidth, not FLOP/s, is the ceiling. XLA's byte count takes every operand
and result of every op as memory traffic, gathered weight copies included, some of which stay in
cache: where it exceeds 100% the count overstates the traffic, not the machine its limit.

    python -m benchmarks.mom_decode                  # ddtp, pools 4,8,16, rows 1,4 (~10 min)
    python -m benchmarks.mom_decode --quick          # tiny shapes: a smoke test
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import harness, mom

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
    side = mom.decode_side(model, params, rows, args, args.seed)
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
  p.add_argument("--size", default=None, help="configs/mom_gpt2.py size (default ddtp)")
  p.add_argument("--pools", type=harness.ints, help="pool sizes N_A = N_F (4,8,16; quick 4,8)")
  p.add_argument("--batches", type=harness.ints, help="decode rows, comma-separated (1,4)")
  p.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (32)")
  p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (64)")
  p.add_argument("--calls", type=int, default=None, help="timed generate calls per side (6)")
  args = p.parse_args(argv)
  harness.defaults(args, size=("tiny", "ddtp"), prompt_length=(8, 32), new_tokens=(8, 64))
  harness.defaults(args, calls=(2, 6), pools=([4, 8], [4, 8, 16]), batches=([1], [1, 4]))
  return args


def main(argv=None):
  args = parse_args(argv)
  setup = mom.load_setup(args.size, None)
  print(f"JAX {jax.__version__} on {jax.default_backend()}; {args.size}: {setup.mom}", flush=True)

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
  harness.report(
    args,
    "mom_decode",
    "size pools batches prompt_length new_tokens calls",
    mom=setup.mom.to_dict(),
    limits=limits,
    results=rows,
    table=table,
  )


if __name__ == "__main__":
  main()
