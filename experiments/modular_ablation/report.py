"""The recipe ablation's table: one row per factor and seed, validation ROUGE-L of the bank's
2x and 3x decoder rungs, each row with its budget (steps, examples seen, training FLOPs,
expected updates of each granularity's modules) from the run's ``compute.json``; then, for every
factor run with more than one seed (``<factor>-s<k>`` is seed k), the mean and spread (max - min)
over its seeds.

    python experiments/modular_ablation/report.py runs/ablation [--out DIR]

Reads ``<runs>/<factor>/eval/*.metrics.json`` (``python -m modjax.evaluate``'s records; for a
plan scored more than once, the newest) and writes ``results.json`` and ``results.md`` to
``--out`` (default: this folder's ``results/``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

import jax
import numpy as np

from modjax.store import bank_io

HERE = os.path.dirname(os.path.abspath(__file__))
RUNGS = {"all-g2": "2x (3 decoder slots)", "all-g3": "3x (2 decoder slots)"}


def scores(run: str) -> dict[str, dict]:
  """{plan name: its newest metrics record} of one run's evaluations."""
  found = {}
  for path in sorted(glob.glob(os.path.join(run, "eval", "*.metrics.json")), key=os.path.getmtime):
    with open(path) as f:
      record = json.load(f)
    if "rougeL" in record:
      found[record["plan_name"]] = record
  return found


def trainable_params(run: str) -> int | None:
  """Parameters the bank trains: its module blocks (``m<g>.<j>``); the teacher stays frozen.
  None where ``run`` holds records but no bank."""
  if not bank_io.is_bank(run):
    return None
  params = bank_io.load_bank(run).params
  modules = [
    tree
    for stack in ("encoder", "decoder")
    for name, tree in params.get(stack, {}).get("blocks", {}).items()
    if name.startswith("m")
  ]
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(modules)))


def row(run: str) -> dict | None:
  records = scores(run)
  compute_path = os.path.join(run, "compute.json")
  if not records or not os.path.exists(compute_path):
    return None  # still training, or not yet scored
  with open(compute_path) as f:
    compute = json.load(f)
  name = os.path.basename(os.path.normpath(run))
  factor, seed = re.fullmatch(r"(.+?)(?:-s(\d+))?", name).groups()
  out = {"factor": factor, "seed": int(seed or 0), "steps": compute["steps"]}
  out |= {"examples_seen": compute["examples_seen"], "training_flops": compute["training_flops"]}
  out["module_updates"] = compute["module_updates"]
  out["trainable_params"] = trainable_params(run)
  for plan in RUNGS:
    if plan in records:
      out[f"{plan}_rougeL"] = records[plan]["rougeL"]
      out["examples"] = records[plan]["examples"]
  return out


def seed_spread(rows: list[dict]) -> list[dict]:
  """Per factor with two or more seeds: the seeds, and each rung's mean and spread."""
  out = []
  for factor in sorted({r["factor"] for r in rows}):
    mine = [r for r in rows if r["factor"] == factor]
    if len(mine) < 2:
      continue
    entry = {"factor": factor, "seeds": sorted(r["seed"] for r in mine)}
    entry |= {"steps": mine[0]["steps"], "trainable_params": mine[0]["trainable_params"]}
    for plan in RUNGS:
      values = [r[f"{plan}_rougeL"] for r in mine if f"{plan}_rougeL" in r]
      if len(values) == len(mine):
        entry[f"{plan}_mean"] = float(np.mean(values))
        entry[f"{plan}_spread"] = max(values) - min(values)
    out.append(entry)
  return out


def _params(count: int | None) -> str:
  return "-" if count is None else f"{count:,}"


def markdown(rows: list[dict], spread: list[dict]) -> str:
  """The rows, each with what it trains (the decoder modules; the teacher is frozen), its
  parameter count and budget; then the seeds' means and spreads."""
  head = "| factor | seed | trainable decoder-module params | steps | examples seen |"
  head += " training PFLOPs | decoder module updates (g: steps) |"
  head += "".join(f" ROUGE-L {label} |" for label in RUNGS.values())
  lines = [head, "|" + "---|" * (7 + len(RUNGS))]
  for r in rows:
    updates = r["module_updates"].get("decoder", {})
    cells = [r["factor"], str(r["seed"]), _params(r["trainable_params"])]
    cells += [str(r["steps"]), str(r["examples_seen"])]
    cells += [
      f"{r['training_flops'] / 1e15:.3f}",
      ", ".join(f"{g}: {n:.0f}" for g, n in updates.items()),
    ]
    cells += [f"{r[f'{p}_rougeL']:.2f}" if f"{p}_rougeL" in r else "-" for p in RUNGS]
    lines.append("| " + " | ".join(cells) + " |")
  if spread:
    head = "| factor | seeds | trainable decoder-module params | steps |"
    lines += ["", head + "".join(f" ROUGE-L {v}: mean (spread) |" for v in RUNGS)]
    lines.append("|" + "---|" * (4 + len(RUNGS)))
    for e in spread:
      cells = [e["factor"], ", ".join(map(str, e["seeds"])), _params(e["trainable_params"])]
      cells.append(str(e["steps"]))
      cells += [
        f"{e[f'{p}_mean']:.2f} ({e[f'{p}_spread']:.2f})" if f"{p}_mean" in e else "-" for p in RUNGS
      ]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("runs", help="The folder run.sh trained the banks in.")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args(argv)
  runs = sorted(d for d in glob.glob(os.path.join(args.runs, "*")) if os.path.isdir(d))
  rows = sorted(
    (r for r in map(row, runs) if r is not None), key=lambda r: (r["factor"], r["seed"])
  )
  if not rows:
    raise SystemExit(
      f"error: no scored bank under {args.runs}; run experiments/modular_ablation/run.sh"
    )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    spread = seed_spread(rows)
    json.dump({"runs": os.path.abspath(args.runs), "rows": rows, "seeds": spread}, f, indent=1)
  table = markdown(rows, spread)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
