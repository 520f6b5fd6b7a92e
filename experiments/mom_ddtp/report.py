"""Table and loss curves of experiments/mom_ddtp/run.sh (phase two) and scratch.sh (from scratch):
validation perplexity of each run (the ``modjax.evaluate`` metrics) and its training loss per step
(``metrics/train.jsonl``).

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
    "phase two": "vanilla GPT-2 (6 layers), continued",
    "from scratch": "vanilla GPT-2 (6 layers)",
  },
  "renormalized": {
    "phase two": "MoM from it, renormalised gate (paper)",
    "from scratch": "MoM, renormalised gate (paper)",
  },
  "softmax": {"phase two": "MoM from it, softmax gate", "from scratch": "MoM, softmax gate"},
}
SMOOTH = 20  # steps of the running mean drawn over each raw curve
METRICS = ("perplexity", "cross_entropy", "tokens", "examples")


def _metrics(workdir: str) -> dict | None:
  found = sorted(glob.glob(os.path.join(workdir, "eval", "validation_step*.metrics.json")))
  return json.load(open(found[-1])) if found else None


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


def _panel(ax, start: str, runs: dict, root: str) -> list[dict]:
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
    rows[-1].update({k: metrics[k] for k in METRICS})
  ax.set_xlabel("step" + (" (after the 900-step vanilla run)" if start == "phase two" else ""))
  ax.set_ylabel(f"training cross-entropy (mean of {SMOOTH} steps)")
  ax.set_title(f"{start}, {rows[-1]['steps'] if rows else '?'} steps, equal parameters")
  ax.legend(fontsize=8)
  return rows


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
  for ax, ((start, _), runs) in zip(axes.flat, found.items(), strict=False):
    rows += _panel(ax, start, runs, args.runs)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=120)
  lines = ["| start | run | steps | validation perplexity | cross-entropy |"]
  lines += ["| --- | --- | --- | --- | --- |"]
  lines += [
    f"| {r['start']} | {r['label']} | {r['steps']} | {r['perplexity']:.2f} | {r['cross_entropy']:.4f} |"
    for r in rows
  ]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
