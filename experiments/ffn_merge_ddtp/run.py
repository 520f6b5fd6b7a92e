"""FFN merging on ../shared/data at equal parameters: every row is one model with its exact
parameter count, scored before and after the same recovery budget, so quality can be read off one
x-axis (the fraction of the original's parameters) for merging and for layer drop.

  python experiments/ffn_merge_ddtp/run.py --recipe lm            # after train_originals.sh
  python experiments/ffn_merge_ddtp/run.py --recipe ende --seeds 0,1
  python experiments/ffn_merge_ddtp/run.py --report               # tables and curves
  python experiments/ffn_merge_ddtp/run.py --recipe tiny --quick --runs /tmp/ffn_smoke \\
      --results /tmp/ffn_smoke/results --ks 2,3 --multi 0-2+2-4 --drops 1,2 --report
                                                                  # a smoke run (4+4-layer T5)

The rows (``row_specs``): the original and the control (the original given each recovery seed's
budget); ``permute`` and ``vanilla`` merges of one window of k in every stack, k in ``--ks``
(2,3,4), the window chosen on validation; the same over several windows at once (``--multi``:
``0-2+3-5`` merges positions 0-1 and 3-4, each pair into its own FFN); ``permute`` aligned on a
gated FFN's up branch (``--features gate,up``); and the layer-drop baseline: ``n`` whole layers
for n in ``--drops`` (1,2,3; the best n consecutive layers on validation) or explicit lists
(``--drop-lists "5;4,5"``). Each row's file records its parameter count and fraction (exact), the
windows merged or the layers dropped, and for recovered rows the seed and the budget. A row whose
merged model has the same plan, method and features as an earlier row is not scored again: its
file says ``same_as`` and the report lists it.

Every step is a command of the package (``python -m modjax.merge``, ``modjax.train`` with
configs/ffn_merge.py, ``modjax.evaluate``), run only when its output is missing, so a rerun
resumes. Work directories: ``<runs>/ffn/<recipe>/<row>[_rec_s<seed>]``; rows:
``<results>/rows/<recipe>_<row>_<stage>[_s<seed>].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results", "equal_params")


@dataclasses.dataclass(frozen=True)
class Recipe:
  config: str  # the original's config
  folder: str  # its data folder under --data ("" for the embedded task)
  metric: str  # the headline metric
  higher_is_better: bool
  original: str  # the original's workdir under --runs
  flags: tuple[str, ...] = ()  # extra config flags for every command


RECIPES = {
  "lm": Recipe("configs/ddtp_lm.py", "ddtp-summ", "perplexity", False, "ddtp_lm"),
  "ende": Recipe("configs/ddtp_ende.py", "ddtp-ende", "bleu", True, "ddtp_ende"),
  "tiny": Recipe(
    "configs/tiny.py",
    "",
    "perplexity",
    False,
    "ffn/tiny/original",
    ("--config.eval.metrics=perplexity",),
  ),  # fmt: skip
}
QUICK = {"eval_examples": 16, "window_examples": 16, "calib_tokens": 256, "recovery_steps": 4}


@dataclasses.dataclass(frozen=True)
class Spec:
  """One merged or dropped row: its name and the ``python -m modjax.merge`` arguments."""

  name: str
  method: str
  merge_args: tuple[str, ...]
  features: str | None = None


def row_specs(args) -> list[Spec]:
  """The rows asked for (module docstring); a name given twice is an error."""
  specs = []
  for method in ("permute", "vanilla"):
    branches = args.features if method == "permute" else [None]
    for branch in branches:
      prefix = method if branch in (None, "gate") else f"{method}_{branch}"
      extra = (f"--features={branch}",) if branch else ()
      specs += [Spec(f"{prefix}_k{k}", method, (f"--k={k}", *extra), branch) for k in args.ks]
      specs += [
        Spec(f"{prefix}_w{multi}", method, (f"--windows={multi.replace('+', ',')}", *extra), branch)
        for multi in args.multi
      ]
  specs += [Spec(f"drop_n{n}", "drop", (f"--k={n}",)) for n in args.drops]
  for layers in args.drop_lists:
    name = "drop_L" + "-".join(layers.split(","))
    specs.append(Spec(name, "drop", (f"--windows={layers}",)))
  names = [s.name for s in specs]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    sys.exit(f"rows {repeated} are asked for twice; give each k, window set or layer list once")
  return [s for s in specs if s.method in args.methods]


def run(command: list[str], log_path: str) -> None:
  """Runs a package command, its output appended to ``log_path``; stops the script on failure."""
  print(f"$ {' '.join(command)}", flush=True)
  start = time.time()
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
  print(f"  exit {code} after {time.time() - start:.0f} s", flush=True)
  if code:
    sys.exit(f"command failed ({code}); see {log_path}")


def config_arg(recipe: Recipe, args) -> str:
  data = os.path.join(args.data, recipe.folder) if recipe.folder else ""
  return f"{recipe.config}:{data}" if data else recipe.config


def original_dir(recipe: Recipe, args) -> str:
  return os.path.join(args.runs, recipe.original)


def train_original(name: str, recipe: Recipe, args) -> None:
  """The tiny recipe trains its own original (``--original-steps``); the others need
  train_originals.sh first."""
  path = original_dir(recipe, args)
  if os.path.exists(os.path.join(path, "checkpoints")):
    return
  if name != "tiny":
    sys.exit(f"no original at {path}; run experiments/ffn_merge_ddtp/train_originals.sh first")
  run([sys.executable, "-m", "modjax.train", "--config", config_arg(recipe, args),
       f"--config.workdir={path}", f"--config.train.num_steps={args.original_steps}",
       f"--config.checkpoint.every_steps={args.original_steps}", *recipe.flags], args.log)  # fmt: skip


def vocab_flags(recipe: Recipe, args) -> list[str]:
  vocab = os.path.join(original_dir(recipe, args), "vocab", "spm.model")
  return [f"--config.data.vocab_path={vocab}", "--config.data.extra_ids=0"]


def merge(name: str, recipe: Recipe, args, spec: Spec) -> tuple[str, dict]:
  """The merged bank of ``spec`` (made once) and its merge.json."""
  out = os.path.join(args.runs, "ffn", name, spec.name)
  if not os.path.exists(os.path.join(out, "merge.json")):
    run([sys.executable, "-m", "modjax.merge", f"--bank={original_dir(recipe, args)}",
         "--config", config_arg(recipe, args), f"--method={spec.method}", *spec.merge_args,
         f"--out={out}", f"--calib-tokens={args.calib_tokens}",
         f"--config.eval.max_examples={args.window_examples}", *recipe.flags], args.log)  # fmt: skip
  with open(os.path.join(out, "merge.json")) as f:
    record = json.load(f)
  if "windows" not in record:
    sys.exit(f"{out}/merge.json predates the windows record; move {out} away and rerun")
  return out, record


def recover(name: str, recipe: Recipe, args, bank: str, seed: int) -> tuple[str, dict]:
  """``bank`` fine-tuned with the recipe's recovery budget and ``seed`` (data order and
  initialisation of anything random); returns the workdir and the budget."""
  from modjax.train.defaults import load_config  # noqa: PLC0415 -- only when recovering

  workdir = f"{bank}_rec_s{seed}"
  data = os.path.join(args.data, recipe.folder) if recipe.folder else ""
  spec = f"{REPO}/configs/ffn_merge.py:{name},{bank}" + (f",{data}" if data else "")
  overrides = [f"--config.train.seed={seed}", f"--config.data.seed={seed}"]
  cfg = load_config(spec)
  steps = args.recovery_steps or cfg.train.num_steps
  if args.recovery_steps:
    overrides += [f"--config.train.num_steps={steps}", f"--config.checkpoint.every_steps={steps}"]
  run([sys.executable, "-m", "modjax.train", "--config", spec, f"--config.workdir={workdir}",
       *overrides, *recipe.flags], args.log)  # fmt: skip
  budget = {
    "steps": steps,
    "batch_size": cfg.train.batch_size,
    "examples_seen": steps * cfg.train.batch_size,
    "learning_rate": cfg.optimizer.learning_rate,
    "seed": seed,
  }
  return workdir, budget


def evaluate(name: str, recipe: Recipe, args, workdir: str, row: str, extra: dict) -> None:
  """Scores ``workdir`` on the validation split (all of it unless ``--eval-examples``) into
  ``<results>/rows/<row>.json`` with ``extra`` (what the row is)."""
  path = os.path.join(args.results, "rows", f"{row}.json")
  if os.path.exists(path):
    return
  run([sys.executable, "-m", "modjax.evaluate", "--config", config_arg(recipe, args),
       f"--config.workdir={workdir}", f"--config.eval.max_examples={args.eval_examples}",
       *vocab_flags(recipe, args), *recipe.flags], args.log)  # fmt: skip
  newest = max(glob.glob(os.path.join(workdir, "eval", "*.metrics.json")), key=os.path.getmtime)
  with open(newest) as f:
    metrics = json.load(f)
  keep = {k: metrics[k] for k in (recipe.metric, "cross_entropy", "examples") if k in metrics}
  write_row(path, {"recipe": name, **extra, **keep, "workdir": workdir})


def write_row(path: str, row: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(row, f, indent=1)
  os.replace(path + ".tmp", path)


def row_key(record: dict) -> str:
  """What makes two merged models the same: method, feature branch and the merged plan."""
  return json.dumps([record["method"], record.get("features"), record["plan"]], sort_keys=True)


def described(spec: Spec, record: dict) -> dict:
  """What a merged row is: method, windows or dropped layers (chosen on validation, or given),
  and its exact parameters."""
  counts = record["params"]
  return {
    "name": spec.name,
    "method": spec.method,
    "features": record.get("features"),
    "k": record["k"],
    "windows": record["windows"],
    "dropped_layers": record["dropped_layers"],
    "chosen_on_validation": not any(a.startswith("--windows") for a in spec.merge_args),
    "params": {
      "count": counts["merged"],
      "original": counts["original"],
      "fraction": counts["merged"] / counts["original"],
    },
  }


def run_recipe(name: str, args) -> None:
  recipe = RECIPES[name]
  train_original(name, recipe, args)
  merged, seen = [], {}
  for spec in row_specs(args):
    out, record = merge(name, recipe, args, spec)
    row = {**described(spec, record), "merged_dir": out}
    key = row_key(record)
    if key in seen:  # visible: the row file names the row it repeats, and nothing is rescored
      print(f"  row {spec.name} repeats row {seen[key]} (same plan, method, features): not scored")
      write_row(os.path.join(args.results, "rows", f"{name}_{spec.name}_merged.json"),
                {"recipe": name, **row, "stage": "merged", "same_as": seen[key]})  # fmt: skip
      continue
    seen[key] = spec.name
    merged.append((spec, out, row))
  if not merged:
    sys.exit("no merged row to score; check --methods, --ks, --multi and --drops")
  original_params = merged[0][2]["params"]["original"]
  full = {"count": original_params, "original": original_params, "fraction": 1.0}
  base = dict(name="original", method="original", k=1, windows={}, dropped_layers={}, params=full)
  evaluate(name, recipe, args, original_dir(recipe, args), f"{name}_original_original",
           {**base, "stage": "original"})  # fmt: skip
  for seed in args.seeds:
    if args.control:  # the original given the same recovery budget: what the steps alone do
      workdir, budget = recover(name, recipe, args, original_dir(recipe, args), seed)
      extra = {**base, "stage": "recovered", "seed": seed, "recovery": budget}
      evaluate(name, recipe, args, workdir, f"{name}_original_recovered_s{seed}", extra)
  for spec, out, row in merged:
    evaluate(name, recipe, args, out, f"{name}_{spec.name}_merged", {**row, "stage": "merged"})
    if args.recover in ("all", spec.name) or spec.name in args.recover.split(","):
      for seed in args.seeds:
        workdir, budget = recover(name, recipe, args, out, seed)
        extra = {**row, "stage": "recovered", "seed": seed, "recovery": budget}
        evaluate(name, recipe, args, workdir, f"{name}_{spec.name}_recovered_s{seed}", extra)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--recipe", choices=sorted(RECIPES))
  p.add_argument("--report", action="store_true", help="tables and curves from <results>/rows")
  p.add_argument("--runs", default="runs")
  p.add_argument("--data", default="../shared/data")
  p.add_argument("--results", default=RESULTS, help="where rows/ and the report go")
  p.add_argument("--methods", default="permute,vanilla,drop")
  p.add_argument("--ks", default="2,3,4", help="window sizes merged (FFNs into one)")
  p.add_argument("--multi", default="0-2+3-5,0-2+2-4+4-6", help="window sets (+ between windows)")
  p.add_argument("--features", default="gate", help="permute's feature branches: gate,up")
  p.add_argument("--drops", default="1,2,3", help="whole layers dropped (best consecutive)")
  p.add_argument("--drop-lists", default="", help="explicit layer lists: '5;4,5'")
  p.add_argument("--recover", default="all", help="rows recovered: all, none or names")
  p.add_argument("--seeds", default="0", help="recovery seeds (control and every row)")
  p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--calib-tokens", type=int, default=10_000)
  p.add_argument("--window-examples", type=int, default=500)
  p.add_argument("--eval-examples", type=int, default=0, help="0: the whole validation split")
  p.add_argument("--recovery-steps", type=int, default=0, help="0: configs/ffn_merge.py's")
  p.add_argument("--original-steps", type=int, default=300, help="the tiny recipe's original")
  p.add_argument("--quick", action="store_true", help=f"smoke-run sizes: {QUICK}")
  args = p.parse_args(argv)
  if not (args.recipe or args.report):
    p.error("give --recipe lm|ende|tiny (run) or --report (tables and curves)")
  if args.quick:
    for key, value in QUICK.items():
      setattr(args, key, value)
    args.original_steps = min(args.original_steps, 30)
  args.ks, args.drops, args.seeds = _ints(args.ks), _ints(args.drops), _ints(args.seeds)
  args.multi = [m for m in args.multi.split(",") if m]
  args.features = [f for f in args.features.split(",") if f]
  args.drop_lists = [d.strip() for d in args.drop_lists.split(";") if d.strip()]
  args.methods = [m for m in args.methods.split(",") if m]
  args.runs, args.results = os.path.abspath(args.runs), os.path.abspath(args.results)
  args.data = os.path.abspath(args.data)
  return args


def main() -> None:
  args = parse_args()
  if args.recipe:
    os.makedirs(args.runs, exist_ok=True)
    args.log = os.path.join(args.runs, f"ffn_merge_{args.recipe}.log")
    run_recipe(args.recipe, args)
  if args.report:
    sys.path.insert(0, HERE)
    from report import write_report  # noqa: PLC0415 -- matplotlib only when reporting

    write_report(args.results, RECIPES)


if __name__ == "__main__":
  main()
