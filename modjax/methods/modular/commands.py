"""What each ``python -m modjax.assemble`` command does to a bank directory, as Python functions:
:func:`assemble_plan` (one target), :func:`assemble_search` (the search strategy's Pareto
front) and :func:`run_sweep` (the sweep's table and plot). Each checks every input before it
times or writes anything, and saves plans with ``bank_io.save_plan`` beside a record of how
they were chosen (``assembly/<name>.json``). See ``modjax/assemble.py`` for the command line.
"""

from __future__ import annotations

import json
import logging
import os

import jax
from etils import epath

from modjax.core.plan import PlanError
from modjax.methods.modular import latency
from modjax.methods.modular import strategies as st
from modjax.methods.modular import sweep as sw
from modjax.store import bank_io, export, results

log = logging.getLogger("modjax.assemble")

RECORDS = "assembly"  # beside plans/: how each assembled plan was chosen


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '') or d.platform} x{jax.device_count()}"


def default_name(strategy: str, target, seed: int = 0) -> str:
  if isinstance(target, st.Speedup):
    label = f"fast-{target.factor:g}x"
  elif isinstance(target, st.Params):
    label = f"params-{target.fraction:g}"
  else:
    label = f"latency-{target.ms:g}ms" + ("" if target.per == "token" else "-sequence")
  suffix = {"speed-first": "", "random": f"-random-s{seed}"}.get(strategy, f"-{strategy}")
  return label + suffix


def _check_name(bank_dir, name: str, overwrite: bool) -> None:
  if not bank_io._PLAN_NAME.fullmatch(name):  # noqa: SLF001 -- the bank's own rule for names
    raise PlanError(f"--name {name!r} is invalid; use letters, digits, '_', '.', '-'")
  path = epath.Path(bank_dir) / "plans" / f"{name}.json"
  if path.exists() and not overwrite:
    raise PlanError(f"the bank already has a plan named {name!r}; pass --name or --overwrite")


def _front_names(bank_dir, prefix: str) -> list[epath.Path]:
  return sorted((epath.Path(bank_dir) / "plans").glob(f"{prefix}-[0-9][0-9].json"))


def _load(bank_dir) -> bank_io.StoredBank:
  if not bank_dir:
    raise st.AssemblyError("--bank is required: a saved module bank or its training workdir")
  stored = bank_io.load_bank(bank_dir)
  st.granularities_of(stored.model, stored.meta)
  return stored


def _record(bank_dir, name: str, data: dict) -> None:
  root = epath.Path(bank_dir) / RECORDS
  root.mkdir(parents=True, exist_ok=True)
  results.write_text_atomically(root / f"{name}.json", json.dumps(data, indent=1))


def _workload(shapes: st.Shapes, runs: int, warmup: int) -> dict:
  return {
    "device": device_name(),
    "shapes": {
      "batch": shapes.batch,
      "input_length": shapes.input_length,
      "max_new_tokens": shapes.max_new_tokens,
    },
    "runs": runs,
    "warmup": warmup,
  }


def assemble_plan(
  bank_dir,
  strategy: str,
  target,
  *,
  name: str | None = None,
  overwrite: bool = False,
  shapes: st.Shapes = st.DEFAULT_SHAPES,
  runs: int = 5,
  warmup: int = 1,
  seed: int = 0,
  max_timed: int = 8,
) -> dict:
  """Chooses a plan for ``target`` with ``strategy`` (module docstring), saves it in the bank
  as ``name`` and returns its record."""
  if strategy not in st.STRATEGIES:
    raise st.AssemblyError(
      f"unknown --strategy {strategy!r}; use one of {st.STRATEGIES + ('search',)}"
    )
  if target is None:
    raise st.AssemblyError("give one target: --params F, --speedup S or --latency-ms MS")
  st.check_target(target)
  name = name or default_name(strategy, target, seed)
  _check_name(bank_dir, name, overwrite)
  stored = _load(bank_dir)
  model = stored.model
  candidates = st.ladder(model, stored.meta, strategy, shapes=shapes, seed=seed)
  teacher = candidates[0]
  record = {"name": name, "strategy": strategy, "seed": seed, "target": _target_dict(target)}
  if isinstance(target, st.Params):
    chosen = st.choose(candidates, target)
  else:
    timer = latency.Timer(model, stored.params, shapes, runs=runs, warmup=warmup, seed=seed)
    selection = latency.select_measured(candidates, target, timer, max_timed=max_timed)
    chosen = selection.candidate
    record.update(
      _workload(shapes, runs, warmup),
      measured_speedup=selection.speedup,
      ms_per_token=selection.timing.per_token_ms,
      ms_per_sequence=selection.timing.per_sequence_ms,
      teacher_ms_per_token=timer.measure(teacher.plan).per_token_ms,
      plans_timed=len(timer.cache),
    )
  record.update(
    plan=chosen.plan.to_dict(),
    describe=chosen.plan.describe(),
    depths=chosen.depths,
    params_fraction=st.params_fraction(chosen, teacher),
    estimated_speedup=st.estimated_speedup(chosen, teacher),
    ladder_rung=[c.plan for c in candidates].index(chosen.plan),
    ladder_length=len(candidates),
  )
  path = bank_io.save_plan(bank_dir, name, chosen.plan, overwrite=overwrite)
  _record(bank_dir, name, record)
  log.info("saved plan %r -> %s: %s", name, path, chosen.plan.describe())
  return record


def _target_dict(target) -> dict:
  return {"kind": type(target).__name__.lower(), **vars(target)}


def assemble_search(
  bank_dir,
  cfg,
  *,
  prefix: str = "pareto",
  overwrite: bool = False,
  quality: str = "cross_entropy",
  shapes: st.Shapes = st.DEFAULT_SHAPES,
  runs: int = 5,
  warmup: int = 1,
  seed: int = 0,
  max_timed: int = 8,
  max_candidates: int = 48,
) -> dict:
  """The search strategy: saves the front as ``<prefix>-00`` (least compressed), ``-01``, ...
  (with ``overwrite``, stale ``<prefix>-NN`` plans of an earlier search are removed)."""
  if cfg is None:
    raise st.AssemblyError("--strategy search scores plans on data: give --config configs/x.py")
  old = _check_prefix(bank_dir, prefix, overwrite)
  if max_timed < 1 or max_candidates < 2:
    raise st.AssemblyError("--max-timed must be >= 1 and --max-candidates >= 2 for search")
  stored = _load(bank_dir)
  data = sw.load_quality_data(cfg, bank_dir, stored.model, quality)
  scorer = sw.Quality(stored.model, stored.params, data)
  timer = latency.Timer(stored.model, stored.params, shapes, runs=runs, warmup=warmup, seed=seed)
  rows = sw.search(
    stored.model, stored.meta, scorer, timer, max_candidates=max_candidates, max_timed=max_timed
  )
  info = {**_workload(shapes, runs, warmup), "quality": quality, "split": data["split"]}
  _save_numbered(bank_dir, rows, prefix, old, info)
  return {**info, "plans": [r.to_dict() for r in rows]}


def _check_prefix(bank_dir, prefix: str, overwrite: bool) -> list[epath.Path]:
  """Plans ``<prefix>-NN`` already in the bank; an error when there are some and not
  ``overwrite``."""
  _check_name(bank_dir, f"{prefix}-00", True)
  old = _front_names(bank_dir, prefix)
  if old and not overwrite:
    raise PlanError(
      f"the bank already has {prefix}-NN plans ({old[0].stem}, ...); pass --overwrite or --name"
    )
  return old


def _save_numbered(bank_dir, rows, prefix: str, old, info: dict) -> None:
  """Saves ``rows``' plans as ``<prefix>-00``, ``-01``, ... in their order (stale numbered plans
  of the same prefix are removed first), each with its record."""
  for path in old:
    path.unlink()
  for i, row in enumerate(rows):
    row.name = f"{prefix}-{i:02d}"
    bank_io.save_plan(bank_dir, row.name, row.candidate.plan, overwrite=True)
    _record(bank_dir, row.name, {**info, **row.to_dict()})
    log.info("saved %s: %.2fx, %s %.4f", row.name, row.speedup, info["quality"], abs(row.loss))


def run_sweep(
  bank_dir,
  cfg,
  out,
  *,
  strategies=("speed-first", "size-first"),
  min_speedup: float = 1.1,
  max_speedup: float = 6.0,
  quality: str = "cross_entropy",
  shapes: st.Shapes = st.DEFAULT_SHAPES,
  runs: int = 5,
  warmup: int = 1,
  seed: int = 0,
  prefix: str | None = "sweep",
  overwrite: bool = False,
) -> dict:
  """The sweep (module docstring); returns what ``sweep.json`` holds. With ``prefix``, the
  assembled plans of the table are also saved in the bank as ``<prefix>-00`` (least measured
  speed-up), ``-01``, ... (``overwrite``: replace those of an earlier sweep)."""
  if cfg is None:
    raise st.AssemblyError("sweep scores plans on data: give --config configs/x.py[:arg]")
  if not out:
    raise st.AssemblyError("sweep needs --out DIR for sweep.json, sweep.md and pareto.png")
  export.check_output_dir(out)
  strategies = tuple(s.strip() for s in strategies if s.strip())
  unknown = sorted(set(strategies) - set(st.STRATEGIES)) or ([] if strategies else ["(none)"])
  if unknown:
    raise st.AssemblyError(f"--strategies {unknown} unknown; use any of {st.STRATEGIES}")
  if not 0 <= min_speedup <= max_speedup:
    raise st.AssemblyError("--min-speedup and --max-speedup need 0 <= min <= max")
  old = _check_prefix(bank_dir, prefix, overwrite) if prefix else []
  stored = _load(bank_dir)
  data = sw.load_quality_data(cfg, bank_dir, stored.model, quality)
  scorer = sw.Quality(stored.model, stored.params, data)
  timer = latency.Timer(stored.model, stored.params, shapes, runs=runs, warmup=warmup, seed=seed)
  rows = sw.sweep(
    stored.model,
    stored.meta,
    scorer,
    timer,
    strategies=strategies,
    min_speedup=min_speedup,
    max_speedup=max_speedup,
    seed=seed,
  )
  info = {
    "bank": os.fspath(bank_dir),
    **_workload(shapes, runs, warmup),
    "quality": quality,
    "task": data["task"],
    "split": data["split"],
    "examples": data["examples_scored"],
    "strategies": list(strategies),
    "speedup_range": [min_speedup, max_speedup],
    "seed": seed,
  }
  if prefix:
    _save_numbered(bank_dir, [r for r in rows if r.strategy != "teacher"], prefix, old, info)
  return sw.write_sweep(out, rows, info)
