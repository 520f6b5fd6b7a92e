"""Assemble plans from a Modular Transformers bank: by a size or speed target, by search, or as
a sweep; export any of them.

  python -m modjax.assemble --bank DIR --strategy speed-first --speedup 2.0 [--name fast-2x]
  python -m modjax.assemble --bank DIR --strategy size-first --params 0.5
  python -m modjax.assemble --bank DIR --latency-ms 12 --latency-per token --batch 1 \\
      --input-length 64 --max-new-tokens 32
  python -m modjax.assemble --bank DIR --strategy search --config configs/modular_t5.py:tiny
  python -m modjax.assemble sweep --bank DIR --config configs/modular_t5.py:tiny --out DIR
  python -m modjax.assemble export --bank DIR --plan fast-2x --out DIR [--formats orbax,jax,hf]

The first positional argument is the mode: ``plan`` (the default), ``sweep`` or ``export``.
``--bank`` is a saved bank or a module-bank training workdir. Strategies and ladders are
``modjax.methods.modular.strategies``; timing is ``.latency``; scoring, search and the sweep
are ``.sweep``.

* ``plan``: one target. ``--params F`` (fraction of the teacher's parameters the plan uses; the
  cost model decides, nothing is timed); ``--speedup S`` (decoding speed-up vs the teacher,
  MEASURED here: greedy decoding of ``--batch`` x ``--input-length`` tokens for exactly
  ``--max-new-tokens`` tokens, median of ``--runs`` after ``--warmup``); ``--latency-ms MS``
  per ``--latency-per token|sequence`` at that workload, measured here. The chosen plan is the
  least compressed rung of the strategy's ladder that meets the target. It is saved as
  ``plans/<name>.json`` in the bank (default ``fast-2x``, ``params-0.5``, ``latency-12ms``,
  suffixed ``-size-first``/``-random-s<seed>`` for those strategies; an existing name is
  refused unless ``--overwrite``) with the measurements in ``assembly/<name>.json``; every
  command taking ``--plan`` accepts the name. ``--strategy search`` (needs ``--config``) saves
  the Pareto front of quality vs measured latency as ``pareto-00`` (least compressed) ...
* ``sweep``: every rung of ``--strategies`` measuring ``--min-speedup``..``--max-speedup``,
  scored on the config's validation split: ``sweep.json``, ``sweep.md`` and ``pareto.png`` in
  ``--out`` (which must not exist or be empty); the assembled plans are saved in the bank as
  ``sweep-00`` (least measured speed-up), ``sweep-01``, ... (``--name`` sets the prefix).
* ``export``: ``modjax.export`` of a saved plan (``--formats``, ``--batch``, ``--input-length``,
  ``--max-length``, ``--platforms`` as there).

Data for search and sweep: ``--config configs/x.py:arg [--config.key=value]`` as
``modjax.evaluate`` takes it (task, ``data.eval_split``, lengths, ``eval.max_examples``,
vocabulary). Every input is checked before anything is timed or written; bad input is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
from etils import epath

from modjax import bank_io, export
from modjax.methods.modular import latency
from modjax.methods.modular import strategies as st
from modjax.methods.modular import sweep as sw
from modjax.methods.modular.modules import ModularError
from modjax.plan import PlanError

log = logging.getLogger("modjax.assemble")

MODES = ("plan", "sweep", "export")
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
  (root / f"{name}.json").write_text(json.dumps(data, indent=1))


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


# ---- the command line -------------------------------------------------------------------------


def _define_flags(flags) -> None:
  flags.DEFINE_string("bank", None, "A saved module bank or its training workdir.")
  flags.DEFINE_string("mode", None, f"One of {MODES} (or give it as the first argument).")
  flags.DEFINE_string("strategy", "speed-first", f"One of {st.STRATEGIES + ('search',)}.")
  flags.DEFINE_float("params", None, "Target: at most this fraction of the teacher's parameters.")
  flags.DEFINE_float("speedup", None, "Target: measured decoding speed-up vs the teacher.")
  flags.DEFINE_float("latency-ms", None, "Target: measured milliseconds per --latency-per.")
  flags.DEFINE_enum("latency-per", "token", list(st.LATENCY_PER), "Latency per token or sequence.")
  flags.DEFINE_string(
    "name", None, "Saved plan name (search/sweep: the prefix, default 'pareto'/'sweep')."
  )
  flags.DEFINE_bool("overwrite", False, "Replace a saved plan of the same name.")
  flags.DEFINE_integer("batch", 1, "Rows per decoding call (timing; export: jax batch).")
  flags.DEFINE_integer("input-length", 64, "Encoder input tokens (timing; export: jax input).")
  flags.DEFINE_integer("max-new-tokens", 32, "Generated tokens per timed call.")
  flags.DEFINE_integer("runs", 5, "Timed calls per plan (the median counts).")
  flags.DEFINE_integer("warmup", 1, "Untimed calls per plan after the compiling one.")
  flags.DEFINE_integer("seed", 0, "Seed of the random strategy and of the timing inputs.")
  flags.DEFINE_integer("max-timed", 8, "At most this many plans timed by a walk or a search.")
  flags.DEFINE_integer("max-candidates", 48, "search: at most this many plans scored.")
  flags.DEFINE_enum("quality", "cross_entropy", list(sw.QUALITY), "search/sweep: the score.")
  flags.DEFINE_list("strategies", ["speed-first", "size-first"], "sweep: the strategies.")
  flags.DEFINE_float("min-speedup", 1.1, "sweep: lowest measured speed-up listed.")
  flags.DEFINE_float("max-speedup", 6.0, "sweep: highest measured speed-up listed.")
  flags.DEFINE_string("plan", None, "export: a saved plan name or a plan JSON file.")
  flags.DEFINE_string("out", None, "sweep/export: output directory (must not exist or be empty).")
  flags.DEFINE_list("formats", list(export.FORMATS), f"export: any of {export.FORMATS}.")
  flags.DEFINE_integer("max-length", 64, "export: generated tokens the jax decoding cache holds.")
  flags.DEFINE_list("platforms", ["cpu"], "export: jax platforms to lower for.")


def _target(f):
  given = {
    "params": f.params,
    "speedup": f.speedup,
    "latency-ms": f["latency-ms"].value,
  }
  given = {k: v for k, v in given.items() if v is not None}
  if len(given) > 1:
    raise st.AssemblyError(f"give one target, not {', '.join('--' + k for k in given)}")
  if not given:
    return None
  ((kind, value),) = given.items()
  if kind == "params":
    return st.Params(value)
  if kind == "speedup":
    return st.Speedup(value)
  return st.Latency(value, f["latency-per"].value)


def _mode(f, argv) -> str:
  positional = argv[1:]
  if len(positional) > 1 or (positional and f.mode and positional[0] != f.mode):
    raise st.AssemblyError(f"unexpected arguments {positional}; give one mode of {MODES}")
  mode = positional[0] if positional else f.mode or "plan"
  if mode not in MODES:
    raise st.AssemblyError(f"unknown mode {mode!r}; use one of {MODES}")
  return mode


def _dispatch(f, argv) -> None:
  mode = _mode(f, argv)
  if mode == "export":
    if not (f.bank and f.plan and f.out):
      raise st.AssemblyError("export needs --bank, --plan (a saved name or JSON file) and --out")
    export.export(
      f.bank,
      f.plan,
      f.out,
      formats=f.formats,
      batch=f.batch,
      input_length=f["input-length"].value,
      max_length=f["max-length"].value,
      platforms=f.platforms,
    )
    return
  shapes = st.Shapes(f.batch, f["input-length"].value, f["max-new-tokens"].value)
  timing = dict(shapes=shapes, runs=f.runs, warmup=f.warmup, seed=f.seed)
  cfg = f.config
  target = _target(f)
  if mode == "sweep":
    if target is not None:
      raise st.AssemblyError("sweep takes no target; use --min-speedup/--max-speedup")
    run_sweep(
      f.bank,
      cfg,
      f.out,
      strategies=f.strategies,
      min_speedup=f["min-speedup"].value,
      max_speedup=f["max-speedup"].value,
      quality=f.quality,
      prefix=f.name or "sweep",
      overwrite=f.overwrite,
      **timing,
    )
  elif f.strategy == "search":
    if target is not None:
      raise st.AssemblyError("--strategy search takes no target: it saves a Pareto front")
    result = assemble_search(
      f.bank,
      cfg,
      prefix=f.name or "pareto",
      overwrite=f.overwrite,
      quality=f.quality,
      max_timed=f["max-timed"].value,
      max_candidates=f["max-candidates"].value,
      **timing,
    )
    print(json.dumps([p["name"] for p in result["plans"]]))
  else:
    record = assemble_plan(
      f.bank,
      f.strategy,
      target,
      name=f.name,
      overwrite=f.overwrite,
      max_timed=f["max-timed"].value,
      **timing,
    )
    print(json.dumps({k: record[k] for k in ("name", "describe", "params_fraction")}))


def _main(argv) -> None:
  from absl import app, flags

  from modjax import cli

  cli.define_config_flag()
  _define_flags(flags)
  errors = (*cli.USER_ERRORS, st.AssemblyError, ModularError, export.ExportError)

  def run(argv):
    cli.configure_logging()
    try:
      _dispatch(flags.FLAGS, argv)
    except errors as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      sys.exit(cli.EXIT_BAD_INPUT)

  app.run(run, argv=argv, flags_parser=cli._parse_flags)  # noqa: SLF001 -- the shared parser


if __name__ == "__main__":
  _main(sys.argv)
