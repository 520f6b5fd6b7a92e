"""The converged comparison: one decoder-only bank's ladder rungs against a student per size,
every row with its budget, on DDTP-summ validation (what ``train.sh`` trains).

Rows: the teacher; every rung of the bank's speed-first and size-first ladders
(``modjax.methods.modular.strategies.ladder``: what ``assemble`` gives a user, not hand-picked
tilings); layer drop of the teacher at each student depth; the KD, SFT and pseudo-label
students with the teacher's frozen encoder (``<kind>_dec<n>``) and, as a second column, with a
trainable encoder (``..._trainenc``); KD students given the bank's module updates
(``kd_dec<n>_updates``); the bank given the KD students' FLOPs (``bank_kdflops``, its all-g2 and
all-g3 rungs). A run trained with ``SEED=1`` (``-s1``) is a row of seed 1. Budgets per row from
the run's ``compute.json``: steps, examples seen, training FLOPs and the updates of the evaluated
modules (a bank rung: the fewest expected updates among its modules' granularities; a student:
every step). Every model decodes the same validation examples greedily; ROUGE is
``modjax.core.metrics.rouge`` (Google's rouge-score).

    python experiments/modular_converged/compare.py --runs runs/modular_converged \\
        --teacher runs/ddtp_summ6_converged --data ../shared/data/ddtp-summ

Writes ``results.json``, ``results.md`` and ``pareto.png`` to ``--out``; each scored row is kept
in ``--out/rows/`` and reused while its checkpoint step, plan and examples match.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import sys

import numpy as np

from modjax.core.plan import Plan, Slot
from modjax.methods.modular import all_g_plan
from modjax.methods.modular.strategies import ladder
from modjax.store import bank_io

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import ddtp_summ_common as common  # noqa: E402

log = logging.getLogger("compare")
DROP = {4: (0, 2, 4, 5), 3: (0, 2, 4), 2: (0, 3)}  # decoder layers kept, as train.sh's students
HEADLINE = ("bank", "kd", "sft")  # the cells with two seeds


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default="runs/modular_converged", help="What train.sh trained.")
  p.add_argument("--teacher", default="runs/ddtp_summ6_converged", help="The teacher's run.")
  p.add_argument("--data", default="../shared/data/ddtp-summ", help="The DDTP-summ folder.")
  p.add_argument("--max-examples", type=int, default=1000, help="Validation examples (0: all).")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  p.add_argument("--replot", action="store_true", help="Redraw table and plot from results.json.")
  return p.parse_args(argv)


def rung_plans(stored) -> dict[str, Plan]:
  """{label: plan} of the bank's speed-first and size-first rungs, each plan once."""
  plans = {}
  for strategy in ("speed-first", "size-first"):
    for candidate in ladder(stored.model, stored.meta, strategy)[1:]:
      if candidate.plan not in plans.values():
        decoder = " ".join(slot.block for slot in candidate.plan.decoder)
        plans[f"{strategy}: decoder {decoder}"] = candidate.plan
  return plans


def rung_updates(plan: Plan, compute: dict) -> float | None:
  """The fewest expected updates among the granularities of the plan's decoder modules."""
  found = [re.match(r"m(\d+)\.", slot.block) for slot in plan.decoder]
  gs = {f"g{m.group(1)}" for m in found if m}
  updates = compute["module_updates"].get("decoder", {})
  return min(updates[g] for g in gs) if gs else None


def budget(compute: dict | None, updates) -> dict:
  if compute is None:
    return {}
  out = {k: compute[k] for k in ("steps", "examples_seen", "training_flops")}
  return out | {"updates_of_evaluated_modules": updates}


class Scorer:
  """Scores (method, point, run, plan) rows, reusing a cached row of the same step, plan and
  examples."""

  def __init__(self, args, setup):
    self.args, self.setup, self.rows = args, setup, []

  def add(self, method: str, label: str, stored, plan: Plan, seed: int, extra: dict) -> None:
    key = {"step": stored.step, "plan": plan.to_dict(), "examples": len(self.setup[2])}
    name = re.sub(r"[^\w.+-]+", "_", f"{method}-{label}-s{seed}")

    def make_row():
      log.info("scoring %s %s (seed %d): %s", method, label, seed, plan.describe())
      row = {"method": method, "point": label, "seed": seed, "decoder_slots": len(plan.decoder)}
      row |= common.score(stored, plan, self.setup, self.args.batch_size) | extra
      return row | {"speedup_nominal": 6 / len(plan.decoder)}

    path = os.path.join(self.args.out, "rows", f"{name}.json")
    self.rows.append(common.cached_row(path, key, make_row))


def run_dirs(runs: str, name: str) -> list[tuple[str, int]]:
  """(directory, seed) of a run name under ``runs``: ``name`` is seed 0, ``name-s<k>`` seed k."""
  found = [(os.path.join(runs, name), 0)]
  for path in glob.glob(os.path.join(runs, f"{name}-s*")):
    found.append((path, int(path.rsplit("-s", 1)[1])))
  return [(path, seed) for path, seed in found if common.read_compute(path)]


def evaluate_all(args, setup) -> list[dict]:
  scorer = Scorer(args, setup)
  for bank_dir, seed in run_dirs(args.runs, "bank"):
    stored, compute = bank_io.load_bank(bank_dir), common.read_compute(bank_dir)
    if seed == 0:
      scorer.add("teacher", "6 layers", stored, stored.model.identity_plan(), 0, {})
      for depth, kept in DROP.items():
        drop = Plan(
          encoder=stored.model.identity_plan().encoder, decoder=tuple(map(Slot, map(str, kept)))
        )
        scorer.add("drop", f"dec{depth}", stored, drop, 0, {})
    for label, plan in rung_plans(stored).items():
      scorer.add("bank", label, stored, plan, seed, budget(compute, rung_updates(plan, compute)))
  for bank_dir, seed in run_dirs(args.runs, "bank_kdflops"):
    stored, compute = bank_io.load_bank(bank_dir), common.read_compute(bank_dir)
    for g in (2, 3):
      plan = all_g_plan(stored.model, {"decoder": g}, meta=stored.meta)
      scorer.add(
        "bank (KD FLOPs)",
        f"all-g{g}",
        stored,
        plan,
        seed,
        budget(compute, rung_updates(plan, compute)),
      )
  for kind in ("kd", "sft", "pseudo"):
    for depth in DROP:
      for variant, method in (
        ("", kind),
        ("_trainenc", f"{kind} (trainable encoder)"),
        ("_updates", f"{kind} (bank's updates)"),
      ):
        for workdir, seed in run_dirs(args.runs, f"{kind}_dec{depth}{variant}"):
          student, compute = bank_io.load_bank(workdir), common.read_compute(workdir)
          scorer.add(
            method, f"dec{depth}", student, student.plan(), seed, budget(compute, compute["steps"])
          )
  return scorer.rows


def seed_spread(rows: list[dict]) -> list[dict]:
  """Mean and spread (max - min) of ROUGE-L over seeds for the headline cells at 2x and 3x."""
  out = []
  for method in HEADLINE:
    for slots in (3, 2):
      cell = [r for r in rows if r["method"] == method and r["decoder_slots"] == slots]
      if method == "bank":  # the all-g rung of that depth
        cell = [r for r in cell if "m2." in r["point"] or "m3." in r["point"]]
      values = [r["rougeL"] for r in cell]
      if values:
        out.append({"method": method, "decoder_slots": slots, "seeds": len(values)}
                   | {"rougeL_mean": float(np.mean(values)), "rougeL_spread": float(np.ptp(values))})  # fmt: skip
  return out


def markdown(rows: list[dict], examples: int) -> str:
  head = (
    "| method | plan / point | seed | decoder slots | params (M) | ROUGE-1 | ROUGE-2 | ROUGE-L |"
  )
  head += " steps | examples seen | training PFLOPs | updates of evaluated modules |"
  lines = [head, "|" + "---|" * 12]
  for r in sorted(rows, key=lambda r: (-r["decoder_slots"], r["method"], r["point"], r["seed"])):
    flops = f"{r['training_flops'] / 1e15:.3f}" if "training_flops" in r else "-"
    updates = r.get("updates_of_evaluated_modules")
    cells = [
      r["method"],
      r["point"],
      str(r["seed"]),
      str(r["decoder_slots"]),
      f"{r['params_m']:.2f}",
    ]
    cells += [f"{r[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL")]
    cells += [str(r.get("steps", "-")), str(r.get("examples_seen", "-")), flops]
    cells.append("-" if updates is None else f"{updates:.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  return f"Validation ROUGE on {examples} DDTP-summ examples (greedy).\n\n" + "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for method, marker in (("bank", "o"), ("kd", "s"), ("sft", "^"), ("pseudo", "v"), ("drop", "x")):
    points = sorted((r["speedup_nominal"], r["rougeL"]) for r in rows if r["method"] == method)
    if points:
      ax.plot(
        *zip(*points, strict=True),
        marker=marker,
        linestyle="" if method == "bank" else "-",
        label=method,
      )
  teacher = [r["rougeL"] for r in rows if r["method"] == "teacher"]
  if teacher:
    ax.axhline(teacher[0], color="gray", linestyle=":", label="teacher (6+6)")
  ax.set_xlabel("decoder-side speed-up, nominal (6 / decoder slots; encoder whole and frozen)")
  ax.set_ylabel("validation ROUGE-L")
  ax.set_title("One decoder-only bank vs a student per size (DDTP-summ, converged teacher)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  args = parse_args(argv)

  def evaluate():
    setup = common.eval_setup(args.data, args.teacher, args.max_examples)
    rows = evaluate_all(args, setup)
    if not rows:
      raise SystemExit(
        f"error: no finished run under {args.runs}; run experiments/modular_converged/train.sh"
      )
    return rows, len(setup[2]), {"seeds": seed_spread(rows)}

  common.write_report(args, evaluate, markdown, plot)


if __name__ == "__main__":
  main()
