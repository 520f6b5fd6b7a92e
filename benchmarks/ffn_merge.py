"""What FFN merging costs and saves at published shapes: the feature pass, the correlations, the
assignments, and the merged model's size in memory and on disk against the original.

Random weights and tokens (costs do not depend on values) of t5-small (k=2 in both stacks) and
GPT-2 124M (k=4): ``features``: ``collect_stats`` over ``--tokens`` tokens per stack in batches of
``--batch`` x 128 with every pair's cross sums that a candidate window needs (``merge --start
auto``), timed after a compiling pass, with XLA's FLOPs and bytes of the accumulation step against
the same run's ceilings; ``correlations``: every pair's [F, F] Pearson matrix (NumPy);
``assignments``: SciPy's ``linear_sum_assignment`` on the first ``--max-assignments`` pairs;
``merge``: the aligned average of the window at start 0; sizes: bytes each plan reads in memory
and the Orbax directories written by ``export_bank_subset`` (a shared FFN stored once).

    python -m benchmarks.ffn_merge                 # t5-small and gpt2, ~10k tokens each
    python -m benchmarks.ffn_merge --quick         # micro shapes: a smoke test
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp

from benchmarks import harness
from modjax.core import timing
from modjax.core.presets import get_preset
from modjax.methods.ffn_merge import assignment, features, merge_windows, window_pairs
from modjax.methods.ffn_merge.window import candidate_starts
from modjax.models import GPT2, T5
from modjax.store import export

SHAPES = {  # name -> (preset, overrides, k)
  "t5-small": ("t5-small", dict(vocab_size=32128), 2),
  "gpt2": ("gpt2", {}, 4),
  "micro-t5": ("micro", {}, 2),
  "micro-gpt2": ("gpt2-tiny", dict(n_layer=3), 2),
}
LENGTH = 128
TABLE = "shape phase seconds per_unit gflops %peak %bw note"


def build(name: str):
  preset, overrides, k = SHAPES[name]
  config = dataclasses.replace(get_preset(preset), **overrides)
  model = (T5 if "t5" in name else GPT2)(config)
  return model, model.init(jax.random.key(0)), k


def random_batches(model, batch: int, count: int, seed: int = 0) -> list[dict]:
  """Full-length batches of random tokens (every position a real token)."""
  vocab = model.config.vocab_size
  if isinstance(model, T5):
    return [harness.seq2seq_batch(vocab, batch, LENGTH, LENGTH, seed + i) for i in range(count)]
  return [harness.lm_batch(vocab, batch, LENGTH, seed + i) for i in range(count)]


def stack_pairs(model, plan, k: int) -> dict:
  return {s: window_pairs(candidate_starts(plan, (s,), k), k) for s in model.stacks}


def feature_cost(model, plan, params, pairs, batch) -> dict:
  """XLA's FLOPs and bytes of one jitted accumulation step (the feature pass's unit)."""
  static = tuple((s, tuple(pairs[s])) for s in model.stacks)
  d_ff = model.stack_block_spec(model.stacks[0]).d_ff
  initial, accumulate = features._initial_state, features._accumulate  # noqa: SLF001
  state = {s: initial(len(plan.stack(s)), d_ff, len(p)) for s, p in static}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return harness.xla_cost(accumulate, model, plan, static, state, params, batch)


def time_features(model, plan, params, pairs, batches, tokens: int):
  features.collect_stats(model, params, plan, batches[:1], pairs=pairs)  # compiles
  return timing.timed(
    lambda: features.collect_stats(model, params, plan, batches, pairs=pairs, max_tokens=tokens)
  )


def time_alignment(model, stats, pairs, max_assignments: int) -> dict:
  """Seconds for every pair's correlation, and for the assignments of the first
  ``max_assignments`` pairs (each costs the same: one [F, F] problem)."""
  corr, corr_s = timing.timed(
    lambda: [stats.correlation(s, i, j) for s in model.stacks for i, j in pairs[s]]
  )
  timed = corr[:max_assignments]
  assign_s = timing.seconds(lambda: [assignment(c) for c in timed])
  return {"pairs": len(corr), "corr_s": corr_s, "assign_s": assign_s, "assigned": len(timed)}


def sizes(model, params, plan, merged_params, merged_plan) -> dict:
  """In-memory bytes each plan reads, and the on-disk bytes of their Orbax banks."""
  out = {}
  with tempfile.TemporaryDirectory() as root:
    for name, (p, pl) in {
      "original": (params, plan),
      "merged": (merged_params, merged_plan),
    }.items():
      saved = export.export_bank_subset(os.path.join(root, name), model, p, pl)
      out[f"{name}_memory_bytes"] = sum(x.nbytes for x in jax.tree.leaves(saved))
      out[f"{name}_disk_bytes"] = _disk_bytes(os.path.join(root, name))
  return out


def _disk_bytes(directory: str) -> int:
  return sum(
    os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files
  )


def run_shape(name: str, args) -> tuple[list[dict], dict]:
  """The phases' rows (percentages of the ceilings later: :func:`add_percentages`) and the
  shape's record."""
  model, params, k = build(name)
  plan = model.identity_plan()
  pairs = stack_pairs(model, plan, k)
  rows_per_batch = args.batch * LENGTH
  batches = random_batches(model, args.batch, -(-args.tokens // rows_per_batch))
  stats, feat_s = time_features(model, plan, params, pairs, batches, args.tokens)
  cost = feature_cost(model, plan, params, pairs, batches[0])
  n_batches = len(batches)
  flops, nbytes = cost["flops"] * n_batches, cost["bytes"] * n_batches
  align = time_alignment(model, stats, pairs, args.max_assignments)
  n_pairs, corr_s, assign_s, assigned = (
    align[k] for k in ("pairs", "corr_s", "assign_s", "assigned")
  )
  merged, merge_s = timing.timed(
    lambda: merge_windows(model, params, plan, {s: 0 for s in model.stacks}, k, stats=stats)
  )
  size = sizes(model, params, plan, *merged)
  d_ff = model.stack_block_spec(model.stacks[0]).d_ff
  tokens = int(min(stats.count.values()))
  feature = dict(phase="features", seconds=feat_s, per_unit=f"{feat_s / tokens * 1e6:.1f} us/token")
  feature |= dict(gflops=flops / 1e9, gbytes=nbytes / 1e9)
  per_pair = f"{corr_s / n_pairs * 1e3:.1f} ms/pair"
  phases = [
    feature | dict(note=f"{tokens} tokens/stack, {n_pairs} pairs"),
    dict(phase="correlations", seconds=corr_s, per_unit=per_pair, note=f"[{d_ff}, {d_ff}] each"),
    dict(phase="assignments", seconds=assign_s, per_unit=f"{assign_s / assigned:.2f} s/pair")
    | dict(note=f"scipy linear_sum_assignment, {assigned} of {n_pairs} pairs timed"),
    dict(phase="merge", seconds=merge_s, note=f"k={k} at start 0, {len(model.stacks)} stack(s)"),
  ]
  record = {"k": k, "pairs": n_pairs, "assignment_s_per_pair": assign_s / assigned}
  record |= {"tokens": tokens, "batches": n_batches, **cost, **size}
  record["memory_ratio"] = size["merged_memory_bytes"] / size["original_memory_bytes"]
  record["disk_ratio"] = size["merged_disk_bytes"] / size["original_disk_bytes"]
  return [{"shape": name, **phase} for phase in phases], record


def add_percentages(row: dict, limits: dict) -> dict:
  """The feature pass's FLOP/s and bytes/s against this run's ceilings."""
  if "gflops" not in row:
    return row
  shares = harness.roofline(row["gflops"] * 1e9, row["gbytes"] * 1e9, row["seconds"], limits)
  return row | {"%peak": shares["pct_peak_flops"], "%bw": shares["pct_peak_bw"]}


def main(argv=None) -> None:
  parser = harness.parser(__doc__, "ffn_merge")
  shapes = ["micro-t5", "micro-gpt2"], ["t5-small", "gpt2"]
  parser.option("--shapes", *shapes, lambda t: t.split(","), "comma-separated SHAPES")
  parser.option("--tokens", 512, 10_240, help="real tokens per stack")
  parser.option("--batch", 2, 16, help="rows of 128 tokens per batch")
  parser.add_argument("--max-assignments", type=int, default=4, help="assignments timed per shape")
  args = parser.parse_args(argv)

  def run():
    rows, records = [], {}
    for name in args.shapes:
      shape_rows, records[name] = run_shape(name, args)
      rows += shape_rows
      print(f"{name}: {records[name]}", flush=True)
    return rows, records

  (rows, records), limits = harness.around(args.quick, run)
  rows = [add_percentages(row, limits) for row in rows]
  harness.table(rows, TABLE)
  size_rows = [
    {"shape": n, **{k: r[k] for k in r if k.endswith(("_bytes", "_ratio"))}}
    for n, r in records.items()
  ]
  harness.table(size_rows)
  harness.report(args, "tokens batch", limits=limits, rows=rows, shapes=records, length=LENGTH)


if __name__ == "__main__":
  main()
