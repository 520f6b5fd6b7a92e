"""Table and loss curves of experiments/mom_ddtp/run.sh: validation perplexity of each run (the
``modjax.evaluate`` metrics) and its training loss per step (``metrics/train.jsonl``).

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
RUNS = {  # workdir name -> label
  "mom_cmp_vanilla": "vanilla GPT-2 (6 layers), continued",
  "mom_cmp_renormalized": "MoM from it, renormalised gate (paper)",
  "mom_cmp_softmax": "MoM from it, softmax gate",
}


def _metrics(workdir: str) -> dict | None:
  found = sorted(glob.glob(os.path.join(workdir, "eval", "validation_step*.metrics.json")))
  return json.load(open(found[-1])) if found else None


def _losses(workdir: str) -> tuple[list[int], list[float]]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics", "train.jsonl"))]
  key = "ce" if "ce" in rows[0] else "loss"  # MoM logs the task loss apart from the balance loss
  return [r["step"] for r in rows], [r[key] for r in rows]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--runs", default="runs")
  args = p.parse_args()
  out = os.path.join(HERE, "results")
  os.makedirs(out, exist_ok=True)
  rows, fig = [], plt.figure(figsize=(6.5, 4))
  for name, label in RUNS.items():
    workdir = os.path.join(args.runs, name)
    metrics = _metrics(workdir)
    if metrics is None:
      continue
    steps, losses = _losses(workdir)
    plt.plot(steps, losses, label=label, lw=1)
    rows.append({"run": name, "label": label, "steps": steps[-1], **{
      k: metrics[k] for k in ("perplexity", "cross_entropy", "tokens", "examples")}})  # fmt: skip
  plt.xlabel("step (after the 900-step vanilla run)")
  plt.ylabel("training cross-entropy")
  plt.title("phase two on DDTP-summ descriptions, equal parameters")
  plt.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=120)
  lines = ["| run | steps | validation perplexity | cross-entropy |", "| --- | --- | --- | --- |"]
  lines += [
    f"| {r['label']} | {r['steps']} | {r['perplexity']:.2f} | {r['cross_entropy']:.4f} |"
    for r in rows
  ]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
