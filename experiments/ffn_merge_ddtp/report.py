"""Tables and curves of the FFN-merging experiment from ``<results>/rows/*.json`` (run.py): quality
against the fraction of the original's parameters, one curve per method before and after recovery,
with the original and its control (the original given the same recovery budget) at 1.0.

Writes ``results.md``, ``results.json`` and ``quality_vs_params.png`` beside ``rows/``. Two scored
rows that are the same model (recipe, stage, seed, method, features, windows, dropped layers) are
an error; rows run.py did not score because they repeat another (``same_as``) are listed.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

FAMILIES = {  # (method, features) -> (label, colour)
  ("permute", "gate"): ("permute", "C0"),
  ("permute", "up"): ("permute (up branch)", "C2"),
  ("vanilla", None): ("vanilla", "C1"),
  ("drop", None): ("layer drop", "C3"),
}


def load_rows(rows_dir: str) -> list[dict]:
  rows = []
  for path in sorted(glob.glob(os.path.join(rows_dir, "*.json"))):
    with open(path) as f:
      rows.append(json.load(f))
  return rows


def identity(row: dict) -> str:
  keys = ("recipe", "stage", "seed", "method", "features", "windows", "dropped_layers")
  return json.dumps([row.get(k) for k in keys], sort_keys=True)


def check_unique(rows: list[dict]) -> None:
  """Raises when two scored rows are the same model at the same stage and seed."""
  seen = {}
  for row in rows:
    if "same_as" in row:
      continue
    key = identity(row)
    if key in seen:
      raise ValueError(
        f"rows {seen[key]!r} and {row['name']!r} ({row['recipe']}, {row['stage']}) are the same "
        "model; delete one row file"
      )
    seen[key] = row["name"]


def relative(value: float, reference: float, higher_is_better: bool) -> float:
  """Quality kept, as a fraction of the reference's (perplexity: reference / value)."""
  return value / reference if higher_is_better else reference / value


def what(row: dict) -> str:
  """``decoder 0-2,3-5`` (windows merged) or ``drops decoder 4,5`` (layers dropped)."""
  if row["method"] == "original":
    return "nothing"
  if row["method"] == "drop":
    layers = row["dropped_layers"]
    return "drops " + "; ".join(f"{s} {','.join(map(str, p))}" for s, p in layers.items())
  return "; ".join(f"{s} " + ",".join(f"{a}-{b}" for a, b in r) for s, r in row["windows"].items())


def recovered(rows: list[dict], name: str, metric: str) -> list[float]:
  return [r[metric] for r in rows if r["name"] == name and r["stage"] == "recovered"]


def spread(values: list[float]) -> str:
  """``116.15`` or ``116.15 ± 0.12 (2 seeds)`` (half the range)."""
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.ptp(values) / 2:.2f} ({len(values)} seeds)"


def recipe_table(rows: list[dict], metric: str, higher: bool) -> list[str]:
  scored = [r for r in rows if "same_as" not in r]
  base = next(r for r in scored if r["stage"] == "original")[metric]
  control = recovered(scored, "original", metric)
  lines = [
    f"| row | merged or dropped | params | fraction | {metric} | vs original | "
    f"{metric} after recovery | vs control |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  heads = [r for r in scored if r["stage"] in ("original", "merged")]
  for r in sorted(heads, key=lambda r: (-r["params"]["fraction"], r["name"])):
    after = recovered(scored, r["name"], metric)
    kept = f"{relative(np.mean(after), np.mean(control), higher):.1%}" if after and control else ""
    lines.append(
      f"| {r['name']} | {what(r)} | {r['params']['count']:,} | {r['params']['fraction']:.4f} | "
      f"{r[metric]:.2f} | {relative(r[metric], base, higher):.1%} | "
      f"{spread(after) if after else ''} | {kept} |"
    )
  repeats = [r for r in rows if "same_as" in r]
  if repeats:
    lines += ["", "Not scored again (the same merged model as another row):", ""]
    lines += [f"* {r['name']} = {r['same_as']} ({what(r)})" for r in repeats]
  return lines


def plot(path: str, by_recipe: dict, recipes: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(by_recipe), figsize=(6 * len(by_recipe), 4.5), squeeze=False)
  for ax, (name, rows) in zip(axes[0], by_recipe.items(), strict=True):
    metric = recipes[name].metric
    scored = [r for r in rows if "same_as" not in r]
    base = next(r[metric] for r in scored if r["stage"] == "original")
    for (method, features), (label, colour) in FAMILIES.items():
      family = [r for r in scored if (r["method"], r.get("features")) == (method, features)]
      _plot_family(ax, family, metric, label, colour)
    ax.plot([1.0], [base], "k*", ms=10, label="original")
    control = recovered(scored, "original", metric)
    if control:
      ax.plot([1.0], [np.mean(control)], "kx", ms=9, label="control (original + recovery)")
      ax.axhline(np.mean(control), color="k", lw=0.7, ls=":")
    ax.set_xlabel("fraction of the original's parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{name}: {metric} against parameters")
    if metric == "perplexity":
      ax.set_yscale("log")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_family(ax, family, metric, label, colour) -> None:
  """Rows whose window was chosen on validation (one per stack): a line through the merged rows
  (solid) and the recovered means (dashed); given windows (several per stack, explicit layer
  lists): hollow markers of the same colour."""
  for stage, style in (("merged", "-o"), ("recovered", "--s")):
    single, multi = {}, {}
    for r in family:
      if r["stage"] != stage:
        continue
      given = not r.get("chosen_on_validation", True)
      (multi if given else single).setdefault(r["name"], []).append(
        (r["params"]["fraction"], r[metric])
      )
    points = sorted(
      (np.mean([x for x, _ in v]), np.mean([y for _, y in v])) for v in single.values()
    )
    if points:
      ax.plot(*zip(*points, strict=True), style, color=colour, label=f"{label} ({stage})")
    for values in multi.values():
      x, y = np.mean([v[0] for v in values]), np.mean([v[1] for v in values])
      ax.plot([x], [y], style[-1], color=colour, mfc="none", ms=8)


def write_report(results_dir: str, recipes: dict) -> dict:
  rows = load_rows(os.path.join(results_dir, "rows"))
  check_unique(rows)
  by_recipe = {name: [r for r in rows if r["recipe"] == name] for name in recipes}
  by_recipe = {k: v for k, v in by_recipe.items() if any(r["stage"] == "original" for r in v)}
  md = [
    "# FFN merging at equal parameters (validation splits)",
    "",
    "Every row is one model; params counts what its plan reads. Lines in the plot: windows chosen "
    "on validation; hollow markers: given windows (several per stack, explicit layer lists).",
    "",
  ]
  for name, recipe_rows in by_recipe.items():
    recipe = recipes[name]
    md += [f"## {name} ({recipe.config}, {recipe.metric})", ""]
    md += [*recipe_table(recipe_rows, recipe.metric, recipe.higher_is_better), ""]
  with open(os.path.join(results_dir, "results.md"), "w") as f:
    f.write("\n".join(md))
  with open(os.path.join(results_dir, "results.json"), "w") as f:
    json.dump(by_recipe, f, indent=1)
  if by_recipe:
    plot(os.path.join(results_dir, "quality_vs_params.png"), by_recipe, recipes)
  print("\n".join(md))
  return by_recipe
