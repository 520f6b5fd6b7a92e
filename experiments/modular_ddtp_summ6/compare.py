"""Modular Transformers against its baselines on DDTP-summ: validation ROUGE at each speed-up.

One module bank (``runs/summ6_bank``) assembled decoder-side at 4, 3, 2 and 1 decoder layers
(about 1.5x, 2x, 3x and 6x less decoder compute; the encoder is kept whole) and, for the record,
both stacks at g=2 and g=3; the KD, SFT and pseudo-labelling students of the same depths where
they were trained (``runs/summ6_<kind>_dec<n>``); plain layer drop of the teacher at every point
(the layers the students and the modules start from). Every model decodes the same validation
examples greedily; ROUGE is ``modjax.core.metrics.rouge`` (Google's rouge-score).

``--time`` also measures each bank plan's greedy decoding speed-up over the teacher on this
machine (``modjax.methods.modular.latency.Timer``: batch 1, 96 input tokens, 24 new tokens,
interleaved with the teacher); a student or drop plan of the same depth runs the same shapes.

    python experiments/modular_ddtp_summ6/compare.py --runs runs --data ../shared/data/ddtp-summ

Writes ``results.json``, ``results.md`` and ``pareto.png`` to ``--out``; each scored row is kept
in ``--out/rows/`` and reused by a rerun while its checkpoint step, plan and examples match (so a
rerun after one more student finishes scores only that student).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from modjax.core.plan import Plan, Slot
from modjax.methods.modular import all_g_plan, tiling_plan
from modjax.methods.modular.latency import Timer
from modjax.methods.modular.strategies import Shapes
from modjax.store import bank_io

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import ddtp_summ_common as common  # noqa: E402

log = logging.getLogger("compare")

# point: (nominal decoder-side speed-up, decoder tiling, teacher layers kept at that depth)
POINTS = {
  "dec4": (1.5, [(0, 2), (2, 4), (4, 5), (5, 6)], (0, 2, 4, 5)),
  "dec3": (2.0, [(0, 2), (2, 4), (4, 6)], (0, 2, 4)),
  "dec2": (3.0, [(0, 3), (3, 6)], (0, 3)),
  "dec1": (6.0, [(0, 6)], (0,)),
}
BOTH_STACKS = {"enc3+dec3": 2, "enc2+dec2": 3}
STUDENT_KINDS = ("kd", "sft", "pseudo")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default="runs", help="Folder holding the teacher, bank and students.")
  p.add_argument("--data", default="../shared/data/ddtp-summ", help="The DDTP-summ folder.")
  p.add_argument("--max-examples", type=int, default=1000, help="Validation examples (0: all).")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--time", action="store_true", help="Also time each bank plan's decoding.")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  p.add_argument("--replot", action="store_true", help="Redraw table and plot from results.json.")
  return p.parse_args(argv)


def bank_plans(stored) -> dict[str, Plan]:
  model, meta = stored.model, stored.meta
  plans = {"teacher": model.identity_plan()}
  for name, (_, tiling, _) in POINTS.items():
    plans[name] = tiling_plan(model, {"decoder": tiling}, meta=meta)
  for name, g in BOTH_STACKS.items():
    plans[name] = all_g_plan(model, g, meta=meta)
  return plans


def drop_plan(kept: tuple[int, ...], encoder_layers: int) -> Plan:
  return Plan(
    encoder=tuple(Slot(str(i)) for i in range(encoder_layers)),
    decoder=tuple(Slot(str(i)) for i in kept),
  )


def evaluate_all(args, setup) -> list[dict]:
  """One row per (method, point) that exists under ``--runs``."""
  bank_dir = os.path.join(args.runs, "summ6_bank")
  stored = bank_io.load_bank(bank_dir)
  rows = []

  def add(method, point, stored_bank, plan, workdir):
    key = {"step": stored_bank.step, "plan": plan.to_dict(), "examples": len(setup[2])}

    def make_row():
      log.info("scoring %s at %s: %s", method, point, plan.describe())
      row = {"method": method, "point": point}
      row |= common.score(stored_bank, plan, setup, args.batch_size)
      row["speedup_nominal"] = POINTS[point][0] if point in POINTS else None
      return row | {"compute": common.read_compute(workdir) if workdir else None}

    path = os.path.join(args.out, "rows", f"{method}-{point}.json")
    rows.append(common.cached_row(path, key, make_row))

  plans = bank_plans(stored)
  for point, plan in plans.items():
    add("teacher" if point == "teacher" else "modular", point, stored, plan, bank_dir)
  encoder_layers = stored.model.config.num_layers
  for point, (_, _, kept) in POINTS.items():
    add("drop", point, stored, drop_plan(kept, encoder_layers), None)
  for kind in STUDENT_KINDS:
    for point, (_, _, kept) in POINTS.items():
      workdir = os.path.join(args.runs, f"summ6_{kind}_dec{len(kept)}")
      if common.read_compute(workdir):  # written when its training finished
        student = bank_io.load_bank(workdir)
        add(kind, point, student, student.plan(), workdir)
  if args.time:
    timer = Timer(stored.model, stored.params, Shapes(1, 96, 24), runs=7, warmup=1)
    for row in rows:
      if row["method"] in ("modular", "teacher"):
        row["speedup_measured"] = timer.speedup(plans[row["point"]])
  return rows


def markdown(rows: list[dict], examples: int) -> str:
  head = "| method | point | nominal decoder speed-up | measured speed-up | params (M) |"
  head += " ROUGE-1 | ROUGE-2 | ROUGE-L | training PFLOPs |"
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    measured = r.get("speedup_measured")
    has_compute = r.get("compute") and r["method"] != "teacher"  # the teacher's is not counted
    compute = f"{r['compute']['training_flops'] / 1e15:.3f}" if has_compute else "-"
    nominal = f"{r['speedup_nominal']:.1f}x" if r["speedup_nominal"] else "-"
    lines.append(
      f"| {r['method']} | {r['point']} | {nominal} | "
      f"{f'{measured:.2f}x' if measured else '-'} | {r['params_m']:.2f} | {r['rouge1']:.2f} | "
      f"{r['rouge2']:.2f} | {r['rougeL']:.2f} | {compute} |"
    )
  return f"Validation ROUGE on {examples} DDTP-summ examples (greedy).\n\n" + "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  teacher = next(r for r in rows if r["method"] == "teacher")
  ax.axhline(teacher["rougeL"], color="gray", linestyle=":", label="teacher (6+6)")
  for method, marker in (("modular", "o"), ("kd", "s"), ("sft", "^"), ("pseudo", "v")):
    points = sorted(
      (r["speedup_nominal"], r["rougeL"])
      for r in rows
      if r["method"] == method and r["speedup_nominal"]
    )
    if points:
      ax.plot(*zip(*points, strict=True), marker=marker, label=method)
  drop = sorted((r["speedup_nominal"], r["rougeL"]) for r in rows if r["method"] == "drop")
  ax.plot(*zip(*drop, strict=True), marker="x", linestyle="--", label="layer drop")
  ax.set_xscale("log")
  ax.set_xticks([1.5, 2, 3, 6], labels=["1.5x", "2x", "3x", "6x"])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("decoder-side speed-up (6 / decoder layers; encoder whole)")
  ax.set_ylabel("validation ROUGE-L")
  ax.set_title("One module bank vs a student per size (DDTP-summ)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  args = parse_args(argv)

  def evaluate():
    setup = common.eval_setup(args.data, os.path.join(args.runs, "ddtp_summ6"), args.max_examples)
    return evaluate_all(args, setup), len(setup[2]), {}

  common.write_report(args, evaluate, markdown, plot)


if __name__ == "__main__":
  main()
