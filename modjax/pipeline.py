"""The whole Modular Transformers pipeline in one command (the README's first command):

  python -m modjax.pipeline --config configs/quickstart.py --config.workdir=runs/quickstart

1. teacher: ``modjax.train`` on the teacher's run config        -> ``<workdir>/teacher``
2. bank: multi-grained module replacing against that teacher     -> ``<workdir>/bank``
3. sweep: every assembled plan between the speed-up bounds, timed on this device and scored on
   the validation split                                          -> ``<workdir>/sweep``
   (``sweep.json``, ``sweep.md``, ``pareto.png``; the plans are also saved in the bank by name)
4. export: the fastest Pareto plan up to ``export_speedup`` as a Hugging Face checkpoint
                                                                  -> ``<workdir>/export``

Stages that are done are resumed, not redone (training restores its last checkpoint; a sweep
or export directory that exists is kept). Each stage is the library call its own command line
makes, so a stage can also be run by hand (the log prints the equivalent command).
"""

from __future__ import annotations

import json
import logging
import time

from etils import epath

from modjax import assemble
from modjax.core import cli
from modjax.core.plan import Plan
from modjax.core.run_config import with_values
from modjax.methods.modular import strategies as st
from modjax.methods.modular.run import train_bank
from modjax.store import bank_io, export
from modjax.train.experiment import ConfigError
from modjax.train.loop import train

log = logging.getLogger("modjax.pipeline")
STAGES = ("teacher", "bank", "sweep", "export")


def _stage(index: int, name: str, started: float) -> None:
  log.info(
    "==== stage %d/%d: %s (%.0fs elapsed) ====", index + 1, len(STAGES), name, time.time() - started
  )


def run_pipeline(cfg) -> dict:
  """Runs every stage; returns where each output is."""
  if not cfg.workdir:
    raise ConfigError("config.workdir is empty; pass --config.workdir=runs/quickstart")
  root = epath.Path(cfg.workdir)
  teacher_cfg = with_values(cfg.teacher, {"workdir": str(root / "teacher")})
  bank_cfg = with_values(
    cfg.bank, {"workdir": str(root / "bank"), "modular.teacher": teacher_cfg.workdir}
  )
  started = time.time()
  _stage(0, "teacher", started)
  train(teacher_cfg)
  _stage(1, "module bank", started)
  train_bank(bank_cfg)
  _stage(2, "sweep of assembled plans", started)
  record = _sweep(cfg.sweep, bank_cfg, root)
  _stage(3, "export", started)
  exported = _export(bank_cfg.workdir, root, record, cfg.export_speedup)
  outputs = {
    "teacher": teacher_cfg.workdir,
    "bank": bank_cfg.workdir,
    "sweep": str(root / "sweep"),
    "export": exported,
  }
  (root / "pipeline.json").write_text(json.dumps(outputs, indent=1))
  log.info("done in %.0fs: %s", time.time() - started, outputs)
  return outputs


def _sweep(s, bank_cfg, root: epath.Path) -> dict:
  """The sweep ``s`` (``config.sweep``) over the bank's plans, or the one already written."""
  out = root / "sweep"
  if (out / "sweep.json").exists():
    log.info("sweep exists at %s; keeping it", out)
    return json.loads((out / "sweep.json").read_text())
  return assemble.run_sweep(
    bank_cfg.workdir,
    bank_cfg,
    str(out),
    strategies=tuple(s.strategies.split(",")),
    min_speedup=s.min_speedup,
    max_speedup=s.max_speedup,
    quality=s.quality,
    shapes=st.Shapes(batch=s.batch, input_length=s.input_length, max_new_tokens=s.max_new_tokens),
    runs=s.runs,
    overwrite=True,  # a sweep that died before writing sweep.json left its sweep-NN plans
  )


def choose_export(record: dict, max_speedup: float) -> dict | None:
  """The assembled plan to export: on the Pareto front, the fastest measured speed-up up to
  ``max_speedup`` (else the slowest front plan); the teacher's own row is never chosen."""
  assembled = [r for r in record["plans"] if r["strategy"] != "teacher"]
  front = [r for r in assembled if r["pareto"]] or assembled
  if not front:
    return None
  within = [r for r in front if r["measured_speedup"] <= max_speedup]
  pick = (
    max(within, key=lambda r: r["measured_speedup"])
    if within
    else min(front, key=lambda r: r["measured_speedup"])
  )
  return pick


def _export(bank_dir: str, root: epath.Path, record: dict, max_speedup: float) -> str | None:
  out = root / "export"
  if out.exists():
    log.info("export exists at %s; keeping it", out)
    return str(out)
  row = choose_export(record, max_speedup)
  if row is None:
    log.warning("the sweep produced no plan to export")
    return None
  stored = bank_io.load_bank(bank_dir)
  plan = Plan.from_dict(row["plan"])
  result = export.export_hf(str(out), stored.model, stored.params, plan)
  log.info(
    "exported plan %s (measured %.2fx, %s) to %s",
    row.get("name") or plan.describe(),
    row["measured_speedup"],
    row["quality"],
    result.directory,
  )
  return str(out)


def main(config) -> None:
  run_pipeline(config)


if __name__ == "__main__":
  cli.run(main)
