"""Tables and the plot of the FFN-merging experiment from ``results/rows/*.json``."""

from __future__ import annotations

import glob
import json
import os


def load_rows(rows_dir: str) -> list[dict]:
  rows = []
  for path in sorted(glob.glob(os.path.join(rows_dir, "*.json"))):
    with open(path) as f:
      rows.append(json.load(f))
  return rows


def relative(value: float, original: float, higher_is_better: bool) -> float:
  """Quality kept, as a fraction of the original's (perplexity: original / merged)."""
  return value / original if higher_is_better else original / value


def is_original(row: dict) -> bool:
  return row["method"] == "original" and row.get("stage", "original") == "original"


def recipe_table(recipe: str, rows: list[dict], metric: str, higher: bool) -> list[str]:
  base = next(r for r in rows if is_original(r))[metric]
  control = next((r for r in rows if r["method"] == "original" and not is_original(r)), None)
  after = (
    f"{control[metric]:.2f} | {relative(control[metric], base, higher):.1%}" if control else " | "
  )
  lines = [
    f"| method | k | FFNs merged | params | {metric} before | kept | {metric} after recovery | kept |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
    f"| original | 1 | 0 | 1.000 | {base:.2f} | 100% | {after} |",
  ]
  merged = sorted(
    (r for r in rows if r.get("stage") == "merged"), key=lambda r: (r["k"], r["method"])
  )
  for r in merged:
    after = next(
      (
        x
        for x in rows
        if x.get("stage") == "recovered" and (x["method"], x["k"]) == (r["method"], r["k"])
      ),
      None,
    )
    before = f"{r[metric]:.2f} | {relative(r[metric], base, higher):.1%}"
    rec = f"{after[metric]:.2f} | {relative(after[metric], base, higher):.1%}" if after else " | "
    merged_count = "none: whole layers" if r["method"] == "drop" else f"{r['k']} of 6 per stack"
    lines.append(
      f"| {r['method']} | {r['k']} | {merged_count} | {r['params']['fraction']:.3f} | {before} | {rec} |"
    )
  return lines


def plot(path: str, by_recipe: dict, recipes: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(by_recipe), figsize=(5.5 * len(by_recipe), 4), squeeze=False)
  for ax, (recipe, rows) in zip(axes[0], by_recipe.items(), strict=True):
    _, _, metric, _ = recipes[recipe]
    base = next(r[metric] for r in rows if is_original(r))
    for method, color in (("permute", "C0"), ("vanilla", "C1"), ("drop", "C3")):
      for stage, style in (("merged", "-o"), ("recovered", "--s")):
        pts = sorted(
          (r["k"], r[metric]) for r in rows if r["method"] == method and r.get("stage") == stage
        )
        if pts:
          xs, ys = (
            zip(*[(1, base), *pts], strict=True) if stage == "merged" else zip(*pts, strict=True)
          )
          ax.plot(xs, ys, style, color=color, label=f"{method} ({stage})")
    ax.axhline(base, color="k", lw=0.8, ls=":", label="original")
    control = [r[metric] for r in rows if r["method"] == "original" and not is_original(r)]
    if control:
      ax.plot([1], control, "k*", label="original + recovery budget")
    ax.set_xlabel("FFNs merged into one per stack (k)")
    ax.set_ylabel(metric)
    ax.set_title(f"{recipe}: {metric} vs merged FFNs")
    if metric == "perplexity":
      ax.set_yscale("log")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_report(results_dir: str, rows_dir: str, recipes: dict) -> None:
  rows = load_rows(rows_dir)
  by_recipe = {name: [r for r in rows if r["recipe"] == name] for name in recipes}
  by_recipe = {k: v for k, v in by_recipe.items() if any(is_original(r) for r in v)}
  md = ["# FFN merging on DDTP (validation splits)", ""]
  for recipe, recipe_rows in by_recipe.items():
    _, folder, metric, higher = recipes[recipe]
    md += [
      f"## {recipe} ({folder}, {metric})",
      "",
      *recipe_table(recipe, recipe_rows, metric, higher),
      "",
    ]
  with open(os.path.join(results_dir, "results.md"), "w") as f:
    f.write("\n".join(md))
  with open(os.path.join(results_dir, "results.json"), "w") as f:
    json.dump(by_recipe, f, indent=1)
  if by_recipe:
    plot(os.path.join(results_dir, "merging.png"), by_recipe, recipes)
  print("\n".join(md))
