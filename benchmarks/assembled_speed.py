"""Assembled Modular Transformers plans: measured encode and decode latency vs an honest roofline.

A random T5 of t5-small's shapes (vocabulary 32128, tied head) and a module bank on top of it
(``add_modules``: granularities {2, 3, 6} in both stacks); speed does not depend on what the
weights hold. Plans (``tiling_plan``) from the teacher to every decoder depth (mixed tilings of
5, 4 and 3 slots, all-g2, all-g3, all-g6) and both stacks compressed alike. Per plan and batch
size, interleaved over ``--rounds`` rounds, each time the fastest call (every call's in the JSON):

* ``encode_ms``: ``model.encode`` over batch x ``--input-length`` tokens, jitted;
* ``decode_ms_per_token``: generate's loop body (decode step, argmax, score) as ``--chunk`` steps
  per jitted call from a prefilled, donated cache of ``--new-tokens`` positions;
* ``generate_ms``: the whole ``decoding.generate`` call (greedy, prepared head) of exactly
  ``--new-tokens`` tokens per row (``eos_id=-1``; the lengths are checked).

The ideal per plan: ``modjax.models.cost.plan_cost`` against the ceilings measured in the same
run, time = max(FLOPs / peak FLOP/s, bytes / bandwidth), for a decode step (every slot's
projections, attention over the allocated cache and the encoder output, the head; the decoder
weights the plan reads, the tied head, the KV caches and cross keys/values), the encoder, and the
sequence (encode + cross k/v + new_tokens steps). ``ideal_speedup`` = teacher ideal / plan ideal,
``realised_over_ideal`` = measured / ideal speed-up (``encode_`` and ``sequence_`` variants too).
The head is the same for every plan: ``head_cap_speedup`` is the teacher's ideal over the head
alone, the most dropping decoder layers can give.

    python -m benchmarks.assembled_speed            # t5-small shapes, several minutes on CPU
    python -m benchmarks.assembled_speed --quick    # micro shapes: a smoke test
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from modjax.core.model_config import to_dtype
from modjax.core.presets import get_preset
from modjax.decoding import argmax, generate, prepare
from modjax.methods.modular import add_modules, bank_granularities, tiling_plan
from modjax.models import T5, bank, cost

NEVER = -1  # an EOS id no token has: every row generates exactly max_new_tokens


G2, G3 = [(0, 2), (2, 4), (4, 6)], [(0, 3), (3, 6)]
# shape -> (preset, overrides, {plan name: {stack: tiling}}); stacks left out keep their layers.
SHAPES = {
  "t5-small": ("t5-small", dict(vocab_size=32128, dropout_rate=0.0), {
    "teacher": {},
    "dec-5 (m2.0+4 layers)": {"decoder": [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]},
    "dec-4 (2 layers+m2.1+m2.2)": {"decoder": [(0, 1), (1, 2), (2, 4), (4, 6)]},
    "dec-3 (m3.0+layer 3+m2.2)": {"decoder": [(0, 3), (3, 4), (4, 6)]},
    "dec all-g2": {"decoder": G2}, "dec all-g3": {"decoder": G3}, "dec all-g6": {"decoder": [(0, 6)]},
    "enc+dec all-g2": {"encoder": G2, "decoder": G2},
    "enc+dec all-g3": {"encoder": G3, "decoder": G3},
    "enc+dec all-g6": {"encoder": [(0, 6)], "decoder": [(0, 6)]},
  }),
  "micro": ("micro", dict(num_layers=4, num_decoder_layers=4), {  # --quick: granularities 2, 4
    "teacher": {},
    "dec-3 (m2.0+2 layers)": {"decoder": [(0, 2), (2, 3), (3, 4)]},
    "enc+dec all-g4": {"encoder": [(0, 4)], "decoder": [(0, 4)]},
  }),
}  # fmt: skip
TABLE = "plan batch enc dec encode_ms decode_ms_per_token speedup ideal_speedup"
TABLE += " realised_over_ideal encode_speedup encode_ideal_speedup sequence_speedup"
TABLE += " sequence_ideal_speedup step_mb bound pct_peak_flops pct_peak_bw"
PARTS = ("encode", "steps", "start", "generate")


def build_bank(shape: str, seed: int):
  """(model, bank with modules of every default granularity, its metadata, {name: plan})."""
  preset, overrides, tilings = SHAPES[shape]
  model = T5(dataclasses.replace(get_preset(preset), **overrides))
  params = model.init(jax.random.key(seed))
  params, meta = add_modules(model, params, {})
  plans = {name: tiling_plan(model, spans, meta=meta) for name, spans in tilings.items()}
  return model, jax.device_put(params), meta, plans


@dataclasses.dataclass
class Ideal:
  """Roofline seconds of one plan at one batch size (see the module docstring)."""

  step_flops: float
  step_bytes: float
  step_s: float
  step_bound: str
  encode_flops: float
  encode_s: float
  sequence_s: float


def roofline(model, plan, batch: int, input_length: int, new: int, limits: dict) -> Ideal:
  c = cost.plan_cost(model, plan, batch=batch, input_length=input_length, target_length=new)
  peak_f, peak_b = limits["peak_flops"], limits["peak_bytes_per_s"]
  flops, nbytes = c.decode_step_flops(), c.decode_step_bytes()
  step_s = max(flops / peak_f, nbytes / peak_b)
  itemsize = np.dtype(to_dtype(model.config.param_dtype)).itemsize
  encode_s = max(c.encoder_flops / peak_f, c.params_by_part["encoder"] * itemsize / peak_b)
  sequence_s = encode_s + c.cross_kv_flops / peak_f + new * step_s
  bound = "flops" if flops / peak_f > nbytes / peak_b else "bytes"
  return Ideal(flops, nbytes, step_s, bound, c.encoder_flops, encode_s, sequence_s)


def head_figures(model, teacher_plan, batch: int, input_length: int, new: int, limits: dict):
  """The LM head's share of a teacher decode step and the speed-up cap it sets: the teacher's
  ideal step over the ideal of the head alone (a decoder without layers)."""
  c = model.config
  head_bytes = c.d_model * c.vocab_size * np.dtype(to_dtype(c.dtype)).itemsize
  head_flops = 2 * batch * c.d_model * c.vocab_size
  teacher = cost.plan_cost(
    model, teacher_plan, batch=batch, input_length=input_length, target_length=new
  )
  head_s = max(head_flops / limits["peak_flops"], head_bytes / limits["peak_bytes_per_s"])
  teacher_s = roofline(model, teacher_plan, batch, input_length, new, limits).step_s
  out = {"batch": batch, "head_mb": head_bytes / 1e6}
  out["teacher_weight_mb"] = teacher.decode_weight_bytes / 1e6
  out["teacher_step_mb"] = teacher.decode_step_bytes() / 1e6
  out |= {"head_gflop": head_flops / 1e9, "teacher_step_gflop": teacher.decode_step_flops() / 1e9}
  return out | {"head_cap_speedup": teacher_s / head_s}


def plan_calls(model, params, plan, ids, mask, new: int, prepared, chunk: int):
  """Timed callables of one plan: encode, start_decoding, ``chunk`` decode steps, generate."""
  used = bank.subset(params, plan, model.stacks)  # an assembled model holds only its entries
  encode = jax.jit(lambda p, i, m: model.encode(p, plan, i, input_mask_BS=m)[0])
  start = jax.jit(lambda p, i, m, s: model.start_decoding(p, plan, i, m, new, shared=s))

  def step(p, carry):
    """generate's loop body from position ``t``: one decode step, the argmax and the score
    update per token (the cache is read in full whatever the position)."""
    cache, tok, score, t = carry
    logits, cache = model.decode_step(p, plan, cache, tok, t)
    tok = argmax(logits)
    logp = jnp.take_along_axis(logits, tok[:, None], 1)[:, 0] - jax.nn.logsumexp(logits, -1)
    return None, (cache, tok, score + logp, t + 1)

  steps = harness.looped(step, chunk)  # chunk steps per call, the carry donated
  state = {}

  def run_steps():
    if not state:  # a prefilled cache, then rewritten in place call to call
      cache, logits, _ = start(used, ids, mask, prepared)
      state["carry"] = (cache, argmax(logits), jnp.zeros(ids.shape[0]), jnp.int32(1))
    _, (cache, tok, score, _) = steps(used, state["carry"])
    state["carry"] = (cache, tok, score, jnp.int32(1))  # each call from position 1 again
    return state["carry"]

  def run_generate():
    return generate(
      model, used, plan, ids, mask, max_new_tokens=new, eos_id=NEVER, prepared=prepared
    )

  return {
    "encode": lambda: encode(used, ids, mask),
    "start": lambda: start(used, ids, mask, prepared),
    "steps": run_steps,
    "generate": run_generate,
  }


def time_plans(calls: dict, rounds: int, repeats: int) -> dict:
  """{plan: {part: [seconds]}}: first calls untimed (every row checked to generate in full),
  then ``rounds`` interleaved rounds, each timing every plan in turn: ``repeats`` encode and
  chunked-steps calls, two starts, one generate."""
  for name, fns in calls.items():
    out = jax.block_until_ready(fns["generate"]())
    lengths = np.asarray(out.lengths)
    if not (lengths == out.tokens.shape[1]).all():
      raise RuntimeError(f"{name}: generated lengths {lengths}; expected all full length")
    for part in ("start", "encode", "steps"):
      jax.block_until_ready(fns[part]())
  fns = {(name, part): calls[name][part] for name in calls for part in PARTS}
  per_round = dict(encode=repeats, steps=repeats, start=2, generate=1)
  seconds = harness.interleaved(fns, rounds, calls={key: per_round[key[1]] for key in fns})
  return {name: {part: seconds[name, part] for part in PARTS} for name in calls}


def batch_seconds(model, params, plans, batch: int, args, prepared) -> dict:
  """Every plan's timings at one batch size (see :func:`time_plans`), on random inputs."""
  rng = np.random.default_rng(args.seed + batch)
  ids_np = rng.integers(2, model.config.vocab_size, (batch, args.input_length), dtype=np.int32)
  ids, mask = jnp.asarray(ids_np), jnp.ones((batch, args.input_length), jnp.int32)
  calls = {
    name: plan_calls(model, params, plan, ids, mask, args.new_tokens, prepared, args.chunk)
    for name, plan in plans.items()
  }
  return time_plans(calls, args.rounds, args.repeats)


def batch_rows(model, params, plans, batch: int, args, limits: dict, seconds: dict) -> list[dict]:
  """One row per plan: measured times (fastest calls), roofline ideals, speed-ups."""
  new = args.new_tokens
  rows = []
  for name, plan in plans.items():
    s = {part: min(v) for part, v in seconds[name].items()}
    ideal = roofline(model, plan, batch, args.input_length, new, limits)
    step_s = s["steps"] / args.chunk
    row = {"plan": name, "batch": batch, "enc": len(plan.encoder), "dec": len(plan.decoder)}
    row["params_m"] = bank.count_params(bank.subset(params, plan, model.stacks)) / 1e6
    row |= {f"{part}_ms": 1e3 * s[part] for part in ("encode", "start", "generate")}
    row |= {"decode_ms_per_token": 1e3 * step_s, "seconds_all": seconds[name]}
    row |= {"ideal_step_ms": 1e3 * ideal.step_s, "ideal_encode_ms": 1e3 * ideal.encode_s}
    row |= {"ideal_sequence_ms": 1e3 * ideal.sequence_s, "step_gflop": ideal.step_flops / 1e9}
    row |= {"step_mb": ideal.step_bytes / 1e6, "bound": ideal.step_bound}
    row |= harness.roofline(ideal.step_flops, ideal.step_bytes, step_s, limits)
    row["encode_pct_peak_flops"] = 100 * ideal.encode_flops / s["encode"] / limits["peak_flops"]
    rows.append(row)
  add_speedups(rows)
  return rows


def add_speedups(rows: list[dict]):
  """Measured and ideal speed-ups against the teacher row (the first), and their ratios."""
  teacher = rows[0]
  pairs = {
    "": ("decode_ms_per_token", "ideal_step_ms"),
    "encode_": ("encode_ms", "ideal_encode_ms"),
    "sequence_": ("generate_ms", "ideal_sequence_ms"),
  }
  for row in rows:
    for prefix, (measured, ideal) in pairs.items():
      speedup = teacher[measured] / row[measured]
      ideal_speedup = teacher[ideal] / row[ideal]
      row[f"{prefix}speedup"] = speedup
      row[f"{prefix}ideal_speedup"] = ideal_speedup
      row[f"{prefix}realised_over_ideal"] = speedup / ideal_speedup


def parse_args(argv=None):
  p = harness.parser(__doc__, "assembled_speed")
  p.option("--batch-sizes", [1, 2], [1, 8], harness.ints)
  p.option("--new-tokens", 6, 64)
  p.option("--input-length", 16, 64)
  p.option("--rounds", 1, 7, help="timed rounds over the plans")
  p.add_argument("--repeats", type=int, default=3, help="encode and steps calls per round")
  p.option("--chunk", 4, 8, help="decode steps per timed call")
  args = p.parse_args(argv)
  args.shape = "micro" if args.quick else "t5-small"
  if not 1 <= args.chunk < args.new_tokens:
    p.error(
      f"--chunk must lie in [1, new tokens): the steps run inside a {args.new_tokens}-token cache"
    )
  return args


def summary_lines(rows: list[dict], heads: list[dict]) -> list[str]:
  worst = min(rows[1:], key=lambda r: r["realised_over_ideal"], default=rows[0])
  lines = [
    f"worst decode realised/ideal: {worst['realised_over_ideal']:.2f} ({worst['plan']}, batch "
    f"{worst['batch']}); target >= 0.9 for every plan"
  ]
  for h in heads:
    lines.append(
      f"batch {h['batch']}: the LM head is {h['head_mb']:.1f} of the {h['teacher_weight_mb']:.1f} "
      f"MB of weights a teacher decode step reads ({h['teacher_step_mb']:.1f} MB with the KV "
      f"caches) and {h['head_gflop']:.3f} of its {h['teacher_step_gflop']:.3f} GFLOP: no decoder "
      f"plan can beat {h['head_cap_speedup']:.2f}x per token (the head alone, ideal)"
    )
  return lines


def main(argv=None):
  args = parse_args(argv)
  model, params, meta, plans = build_bank(args.shape, args.seed)
  prepared = jax.block_until_ready(prepare(model, params))

  def run():
    seconds = {}
    for batch in args.batch_sizes:
      harness.say(f"batch {batch}: compiling and timing {len(plans)} plans ...")
      seconds[batch] = batch_seconds(model, params, plans, batch, args, prepared)
    return seconds

  seconds, limits = harness.around(args.quick, run)
  rows, heads = [], []
  for batch in args.batch_sizes:
    rows += batch_rows(model, params, plans, batch, args, limits, seconds[batch])
    heads.append(
      head_figures(model, plans["teacher"], batch, args.input_length, args.new_tokens, limits)
    )
  table = harness.table(rows, TABLE)
  notes = summary_lines(rows, heads)
  print("\n".join(notes))
  plan_slots = {
    n: {s: [x.block for x in p.stack(s)] for s in model.stacks} for n, p in plans.items()
  }
  out = {"model": dataclasses.asdict(model.config), "weights": "random (modules copied from"}
  out["weights"] += " their span's first layer): speed does not depend on training"
  out["granularities"] = {s: list(bank_granularities(meta, s)) for s in model.stacks}
  out |= {"plans": plan_slots, "limits": limits, "lm_head": heads}
  compressed = [r["realised_over_ideal"] for r in rows if r["plan"] != "teacher"]
  out["min_realised_over_ideal"] = min(compressed)
  harness.report(
    args, "input_length new_tokens rounds", **out, results=rows, notes=notes, table=table
  )


if __name__ == "__main__":
  main()
