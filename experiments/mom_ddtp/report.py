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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = {  # start -> {workdir name: label}
  "phase two": {
    "mom_cmp_vanilla": "vanilla GPT-2 (6 layers), continued",
    "mom_cmp_renormalized": "MoM from it, renormalised gate (paper)",
    "mom_cmp_softmax": "MoM from it, softmax gate",
  },
  "from scratch": {
    "mom_scratch_vanilla": "vanilla GPT-2 (6 layers)",
    "mom_scratch_renormalized": "MoM, renormalised gate (paper)",
    "mom_scratch_softmax": "MoM, softmax gate",
  },
}
METRICS = ("perplexity", "cross_entropy", "tokens", "examples")


def _metrics(workdir: str) -> dict | None:
  found = sorted(glob.glob(os.path.join(workdir, "eval", "validation_step*.metrics.json")))
  return json.load(open(found[-1])) if found else None


def _losses(workdir: str) -> tuple[list[int], list[float]]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics", "train.jsonl"))]
  key = "ce" if "ce" in rows[0] else "loss"  # MoM logs the task loss apart from the balance loss
  return [r["step"] for r in rows], [r[key] for r in rows]


def _panel(ax, start: str, runs: dict, root: str) -> list[dict]:
  """Plots the group's loss curves on ``ax``; returns the rows of the runs that were scored."""
  rows = []
  for name, label in runs.items():
    workdir = os.path.join(root, name)
    metrics = _metrics(workdir)
    if metrics is None:
      continue
    steps, losses = _losses(workdir)
    ax.plot(steps, losses, label=label, lw=1)
    rows.append({"start": start, "run": name, "label": label, "steps": steps[-1]})
    rows[-1].update({k: metrics[k] for k in METRICS})
  ax.set_xlabel("step" + (" (after the 900-step vanilla run)" if start == "phase two" else ""))
  ax.set_ylabel("training cross-entropy")
  ax.set_title(f"{start}, equal parameters")
  ax.legend()
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--runs", default="runs")
  args = p.parse_args()
  out = os.path.join(HERE, "results")
  os.makedirs(out, exist_ok=True)
  fig, axes = plt.subplots(1, len(GROUPS), figsize=(12, 4))
  rows = []
  for ax, (start, runs) in zip(axes, GROUPS.items(), strict=True):
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
