"""FFN merging on ../shared/data: merge (permute, vanilla, drop) at several window sizes, score
before and after the same recovery budget, and tabulate and plot against the original.

  python experiments/ffn_merge_ddtp/run.py --recipe lm     # after train_originals.sh
  python experiments/ffn_merge_ddtp/run.py --recipe ende
  python experiments/ffn_merge_ddtp/run.py --report        # results.{json,md} and merging.png

Every step is a command of the package (``python -m modjax.merge``, ``modjax.train`` with
configs/ffn_merge.py, ``modjax.evaluate``), run only when its output is missing, so a rerun
resumes. Each scored model's metrics land in ``results/rows/<recipe>_<method>_k<k>_<stage>.json``.
The window is chosen on the first ``--window-examples`` validation examples (teacher-forced
cross-entropy); every reported figure is on the whole validation split.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ROWS = os.path.join(RESULTS, "rows")
RECIPES = {  # config, data folder, metric, higher is better
  "lm": ("configs/ddtp_lm.py", "ddtp-summ", "perplexity", False),
  "ende": ("configs/ddtp_ende.py", "ddtp-ende", "bleu", True),
}
METHODS = ("permute", "vanilla", "drop")


def run(command: list[str], log_path: str) -> None:
  """Runs a package command, its output appended to ``log_path``; stops the script on failure."""
  print(f"$ {' '.join(command)}", flush=True)
  start = time.time()
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
  print(f"  exit {code} after {time.time() - start:.0f} s", flush=True)
  if code:
    sys.exit(f"command failed ({code}); see {log_path}")


def evaluate(recipe: str, args, workdir: str, row: str, extra: dict) -> None:
  """Scores ``workdir`` on the whole validation split into ``results/rows/<row>.json``."""
  path = os.path.join(ROWS, f"{row}.json")
  if os.path.exists(path):
    return
  config, folder, metric, _ = RECIPES[recipe]
  data = os.path.join(args.data, folder)
  run(
    [sys.executable, "-m", "modjax.evaluate", "--config", f"{config}:{data}",
     f"--config.workdir={workdir}", "--config.eval.max_examples=0",
     f"--config.data.vocab_path={args.runs}/ddtp_{recipe}/vocab/spm.model",
     "--config.data.extra_ids=0"],
    args.log,
  )  # fmt: skip
  newest = max(glob.glob(os.path.join(workdir, "eval", "*.metrics.json")), key=os.path.getmtime)
  with open(newest) as f:
    metrics = json.load(f)
  keep = {k: metrics[k] for k in (metric, "cross_entropy", "examples") if k in metrics}
  os.makedirs(ROWS, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"recipe": recipe, **extra, **keep, "workdir": workdir}, f, indent=1)


def merge(recipe: str, args, method: str, k: int) -> tuple[str, dict]:
  """The merged bank of ``method`` at window ``k`` (made once) and its merge.json."""
  config, folder, _, _ = RECIPES[recipe]
  out = os.path.join(args.runs, f"ffn_{recipe}_{method}_k{k}")
  if not os.path.exists(os.path.join(out, "merge.json")):
    run(
      [sys.executable, "-m", "modjax.merge", f"--bank={args.runs}/ddtp_{recipe}",
       "--config", f"{config}:{os.path.join(args.data, folder)}", f"--k={k}",
       f"--method={method}", f"--out={out}", f"--calib-tokens={args.calib_tokens}",
       f"--config.eval.max_examples={args.window_examples}"],
      args.log,
    )  # fmt: skip
  with open(os.path.join(out, "merge.json")) as f:
    return out, json.load(f)


def recover(recipe: str, args, merged: str) -> str:
  _, folder, _, _ = RECIPES[recipe]
  workdir = f"{merged}_rec"
  config = f"configs/ffn_merge.py:{recipe},{merged},{os.path.join(args.data, folder)}"
  run([sys.executable, "-m", "modjax.train", "--config", config, f"--config.workdir={workdir}"],
      args.log)  # fmt: skip
  return workdir


def run_recipe(recipe: str, args) -> None:
  original = os.path.join(args.runs, f"ddtp_{recipe}")
  evaluate(recipe, args, original, f"{recipe}_original_k1_original", dict(method="original", k=1))
  if args.control:  # the original given the same recovery budget: what the extra steps alone do
    workdir = recover(recipe, args, original)
    extra = dict(method="original", k=1, stage="recovered")
    evaluate(recipe, args, workdir, f"{recipe}_original_k1_recovered", extra)
  for k in args.ks:
    for method in args.methods:
      merged, record = merge(recipe, args, method, k)
      extra = dict(method=method, k=k, start=record["start"], params=record["params"])
      evaluate(recipe, args, merged, f"{recipe}_{method}_k{k}_merged", {**extra, "stage": "merged"})
      if k == args.recover_k:
        workdir = recover(recipe, args, merged)
        row = f"{recipe}_{method}_k{k}_recovered"
        evaluate(recipe, args, workdir, row, {**extra, "stage": "recovered"})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--recipe", choices=sorted(RECIPES))
  parser.add_argument("--report", action="store_true", help="tables and plot from results/rows")
  parser.add_argument("--runs", default="runs")
  parser.add_argument("--data", default="../shared/data")
  parser.add_argument("--ks", default="2,3", help="window sizes merged (FFNs into one)")
  parser.add_argument("--recover-k", type=int, default=2, help="the window size recovered")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument(
    "--control", action=argparse.BooleanOptionalAction, default=True,
    help="also fine-tune the original with the recovery budget",
  )  # fmt: skip
  parser.add_argument("--calib-tokens", type=int, default=10_000)
  parser.add_argument("--window-examples", type=int, default=500)
  args = parser.parse_args()
  if not (args.recipe or args.report):
    parser.error("give --recipe lm|ende (run) or --report (tables and plot)")
  args.ks = [int(k) for k in args.ks.split(",")]
  args.methods = [m for m in args.methods.split(",") if m]
  if args.recipe:
    args.log = os.path.join(args.runs, f"ffn_merge_{args.recipe}.log")
    run_recipe(args.recipe, args)
  if args.report:
    from report import write_report  # noqa: PLC0415 -- matplotlib only when reporting

    write_report(RESULTS, ROWS, RECIPES)


if __name__ == "__main__":
  main()
