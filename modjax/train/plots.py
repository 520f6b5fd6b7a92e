"""Training-curve plot from the metrics JSONL (the last record of each step wins, so resumed
runs plot once per step)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path) -> dict[int, dict]:
  records = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        records[int(record["step"])] = record
  return dict(sorted(records.items()))


def plot_training_curve(jsonl_path, png_path, validation_path=None) -> None:
  """Training loss per step; with ``validation_path`` (``metrics/validation.jsonl``) the
  validation cross-entropy at its points on the same axes."""
  records = read_metrics(jsonl_path)
  steps = list(records)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(steps, [records[s]["loss"] for s in steps], lw=1, label="training")
  if validation_path is not None and os.path.exists(validation_path):
    points = read_metrics(validation_path)
    ax.plot(
      list(points), [p["cross_entropy"] for p in points.values()], "o-", ms=3, label="validation"
    )
    ax.legend()
  ax.set_xlabel("step")
  ax.set_ylabel("token cross-entropy")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with open(png_path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
