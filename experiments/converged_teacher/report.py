"""The teacher's curve: validation cross-entropy at every point, the training loss averaged per
point, and whether the plateau rule has stopped the run, as results/curve.json and curve.png.
Safe to run while the run trains (it reads the metrics files only).

  python experiments/converged_teacher/report.py runs/ddtp_summ6_converged [--config SPEC]
"""

from __future__ import annotations

import argparse
import json
import os

from modjax.train.defaults import load_config
from modjax.train.plots import plot_training_curve, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_PER_EPOCH = 48_755  # DDTP-summ's training split
CONFIG = "configs/ddtp_summ.py:../shared/data/ddtp-summ,6"


def summarise(run_dir: str, cfg) -> dict:
  metrics = os.path.join(run_dir, "metrics")
  train = read_metrics(os.path.join(metrics, "train.jsonl"))
  points = list(read_metrics(os.path.join(metrics, "validation.jsonl")).values())
  batch = cfg.train.batch_size
  rows, previous = [], 0
  for point in points:
    window = [r["loss"] for s, r in train.items() if previous < s <= point["step"]]
    rows.append(
      {
        "step": point["step"],
        "epochs": round(point["step"] * batch / EXAMPLES_PER_EPOCH, 3),
        "validation_cross_entropy": point["cross_entropy"],
        "validation_perplexity": point["perplexity"],
        "train_loss_mean": sum(window) / len(window) if window else None,
        "plateau": point.get("plateau", False),
      }
    )
    previous = point["step"]
  best = min(rows, key=lambda r: r["validation_cross_entropy"]) if rows else None
  return {
    "run": os.path.basename(os.path.normpath(run_dir)),
    "batch_size": batch,
    "plateau_rule": {
      "window_steps": cfg.train.plateau_window,
      "min_relative_improvement": cfg.train.plateau_min_improvement,
    },
    "converged": bool(rows and rows[-1]["plateau"]),
    "last_step": max(train) if train else 0,
    "best": best,
    "points": rows,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir")
  parser.add_argument("--config", default=CONFIG, help="the config spec the run was trained with")
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  summary = summarise(args.run_dir, load_config(args.config))
  with open(os.path.join(args.out, "curve.json"), "w") as f:
    json.dump(summary, f, indent=1)
  metrics = os.path.join(args.run_dir, "metrics")
  plot_training_curve(
    os.path.join(metrics, "train.jsonl"),
    os.path.join(args.out, "curve.png"),
    os.path.join(metrics, "validation.jsonl"),
  )
  last = summary["points"][-1] if summary["points"] else {}
  print(
    f"step {summary['last_step']}  validation CE {last.get('validation_cross_entropy')}  "
    f"converged {summary['converged']}"
  )


if __name__ == "__main__":
  main()
