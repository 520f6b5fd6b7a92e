"""Table and loss curves of experiments/mom_ddtp/run.sh (phase two) and scratch.sh (from scratch):
validation perplexity of each run (the ``modjax.evaluate`` metrics), its training loss per step
(``metrics/train.jsonl``) and its budget from ``compute.json`` (parameters, training FLOPs, the
mean share of routed slots the capacity buffers dropped; blank for runs that predate it).

  python experiments/mom_ddtp/report.py --runs runs      # results/results.md, results.json, curves.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STARTS = {"mom_cmp": "phase two", "mom_scratch": "from scratch"}  # workdir prefix -> start
RUNS = {  # workdir suffix -> label per start
  "vanilla": {
    "phase two": "vanilla GPT-2 (6 layers), continued on its schedule",
    "from scratch": "vanilla GPT-2 (6 layers)",
  },
  "wider_ffn": {
    "phase two": "vanilla, param-matched (wider FFN), continued",
    "from scratch": "vanilla, param-matched (wider FFN)",
  },
  "extra_layer": {
    "phase two": "vanilla, param-matched (extra layer), continued",
    "from scratch": "vanilla, param-matched (extra layer)",
  },
  "wider_ffn_flops": {
    "phase two": "vanilla, param-matched (wider FFN), MoM's FLOPs, continued",
    "from scratch": "vanilla, param-matched (wider FFN), MoM's FLOPs",
  },
  "renormalized": {
    "phase two": "MoM from it, renormalised gate (paper)",
    "from scratch": "MoM, renormalised gate (paper)",
  },
  "straight_through": {
    "phase two": "MoM from it, straight-through gate (paper's forward pass)",
    "from scratch": "MoM, straight-through gate (paper's forward pass)",
  },
  "softmax": {"phase two": "MoM from it, softmax gate", "from scratch": "MoM, softmax gate"},
  "authors": {
    "phase two": "MoM from it, authors' defaults (anchor, H=8), straight-through",
    "from scratch": "MoM, authors' defaults (anchor, H=8), straight-through",
  },
}
SMOOTH = 20  # steps of the running mean drawn over each raw curve
METRICS = ("perplexity", "cross_entropy", "tokens", "examples")


def _metrics(workdir: str) -> dict | None:
  found = sorted(glob.glob(os.path.join(workdir, "eval", "validation_step*.metrics.json")))
  return json.load(open(found[-1])) if found else None


def _compute(workdir: str) -> dict:
  """Parameters, training FLOPs and mean capacity drop rate from the run's compute.json."""
  path = os.path.join(workdir, "compute.json")
  if not os.path.exists(path):
    return {"params": None, "training_flops": None, "capacity_dropped": None}
  record = json.load(open(path))
  dropped = record.get("capacity_dropped")
  return {
    "params": record["params"],
    "training_flops": record["training_flops"],
    "capacity_dropped": dropped["mean"] if dropped else None,
  }


def _losses(workdir: str) -> tuple[list[int], list[float]]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics", "train.jsonl"))]
  key = "ce" if "ce" in rows[0] else "loss"  # MoM logs the task loss apart from the balance loss
  return [r["step"] for r in rows], [r[key] for r in rows]


def groups(root: str) -> dict:
  """{(start, steps): {workdir name: label}} of the run.sh / scratch.sh workdirs under ``root``
  (``<prefix><steps>_<run>``), phase two first, then by steps."""
  pattern = re.compile(rf"({'|'.join(STARTS)})(\d+)_({'|'.join(RUNS)})$")
  found = {}
  for path in glob.glob(os.path.join(root, "mom_*")):
    match = pattern.match(os.path.basename(path))
    if match:
      prefix, steps, run = match.groups()
      start = STARTS[prefix]
      found.setdefault((start, int(steps)), {})[match.group(0)] = (run, RUNS[run][start])
  order = list(STARTS.values())
  keys = sorted(found, key=lambda key: (order.index(key[0]), key[1]))
  return {
    key: dict(sorted(found[key].items(), key=lambda kv: list(RUNS).index(kv[1][0]))) for key in keys
  }


def _panel(ax, start: str, mom_steps: int, runs: dict, root: str) -> list[dict]:
  """Plots the group's loss curves on ``ax``; returns the rows of the runs that were scored."""
  rows = []
  for name, (_, label) in runs.items():
    workdir = os.path.join(root, name)
    metrics = _metrics(workdir)
    if metrics is None:
      continue
    steps, losses = _losses(workdir)
    line = ax.plot(steps, losses, lw=0.5, alpha=0.3)[0]
    window = min(SMOOTH, len(losses))
    mean = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], mean, color=line.get_color(), lw=1.5, label=label)
    rows.append({"start": start, "run": name, "label": label, "steps": steps[-1]})
    rows[-1].update({k: metrics[k] for k in METRICS}, **_compute(workdir))
  ax.set_xlabel("step" + (" (after the vanilla original)" if start == "phase two" else ""))
  ax.set_ylabel(f"training cross-entropy (mean of {SMOOTH} steps)")
  ax.set_title(f"{start}, {mom_steps} MoM steps")
  ax.legend(fontsize=8)
  return rows


def _line(r: dict) -> str:
  params = f"{r['params'] / 1e6:.2f}M" if r["params"] else ""
  flops = f"{r['training_flops'] / 1e15:.1f}" if r["training_flops"] else ""
  dropped = "" if r["capacity_dropped"] is None else f"{r['capacity_dropped']:.2%}"
  return (
    f"| {r['start']} | {r['label']} | {r['steps']} | {params} | {flops} | {r['perplexity']:.2f} "
    f"| {r['cross_entropy']:.4f} | {dropped} |"
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--runs", default="runs")
  args = p.parse_args()
  out = os.path.join(HERE, "results")
  os.makedirs(out, exist_ok=True)
  scored = lambda runs: any(_metrics(os.path.join(args.runs, name)) for name in runs)  # noqa: E731
  found = {key: runs for key, runs in groups(args.runs).items() if scored(runs)}
  if not found:
    raise SystemExit(
      f"error: no mom_cmp<steps>_* or mom_scratch<steps>_* runs under {args.runs}; give --runs"
    )
  columns = min(2, len(found))
  grid = (len(found) + columns - 1) // columns
  fig, axes = plt.subplots(grid, columns, figsize=(6 * columns, 4 * grid), squeeze=False)
  for ax in axes.flat[len(found) :]:
    ax.set_visible(False)
  rows = []
  for ax, ((start, steps), runs) in zip(axes.flat, found.items(), strict=False):
    rows += _panel(ax, start, steps, runs, args.runs)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=120)
  lines = ["| start | run | steps | params | training PFLOP | validation perplexity |"]
  lines[0] += " cross-entropy | capacity dropped |"
  lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
  lines += [_line(r) for r in rows]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
