"""Assemble plans from a Modular Transformers bank: by a size or speed target, by search, or as
a sweep; export any of them.

  python -m modjax.assemble --bank DIR --strategy speed-first --speedup 2.0 [--name fast-2x]
  python -m modjax.assemble --bank DIR --strategy size-first --params 0.5
  python -m modjax.assemble --bank DIR --latency-ms 12 --latency-per token --batch 1 \\
      --input-length 64 --max-new-tokens 32
  python -m modjax.assemble --bank DIR --strategy search --config configs/modular_t5.py:tiny
  python -m modjax.assemble sweep --bank DIR --config configs/modular_t5.py:tiny --out DIR
  python -m modjax.assemble export --bank DIR --plan fast-2x --out DIR [--formats orbax,jax,hf]
  python -m modjax.assemble draft --bank DIR --config configs/modular_t5.py:tiny \
      [--draft-tokens 2,3,4,6] [--name draft]

The first positional argument is the mode: ``plan`` (the default), ``sweep``, ``export`` or
``draft``.
``--bank`` is a saved bank or a module-bank training workdir. Strategies and ladders are
``modjax.methods.modular.strategies``; timing is ``.latency``; scoring, search and the sweep
are ``.sweep``; each command as a Python function is ``.commands`` (re-exported here).

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
* ``draft``: the draft plan and k of self-speculative decoding with the most measured tokens/s
  on ``--sample`` validation examples at ``--batch`` rows (``.drafting``: candidates, timing);
  saved as ``--name`` (default ``draft``) with its measurements when it beats plain greedy
  decoding of the full plan (``--plan``, default the bank's default plan), else nothing is
  saved (exit 0). ``python -m modjax.evaluate --draft <name>`` then decodes with it.

Data for search and sweep: ``--config configs/x.py:arg [--config.key=value]`` as
``modjax.evaluate`` takes it (task, ``data.eval_split``, lengths, ``eval.max_examples``,
vocabulary). Every input is checked before anything is timed or written; bad input is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import json

from modjax import export
from modjax.methods.modular import drafting
from modjax.methods.modular import strategies as st
from modjax.methods.modular import sweep as sw
from modjax.methods.modular.commands import assemble_plan, assemble_search, run_sweep

assemble_draft = drafting.assemble_draft
__all__ = ["assemble_draft", "assemble_plan", "assemble_search", "run_sweep"]  # re-exported

MODES = ("plan", "sweep", "export", "draft")


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
  flags.DEFINE_string(
    "plan", None, "export: a saved plan name or a plan JSON file; draft: the full plan's name."
  )
  flags.DEFINE_string("out", None, "sweep/export: output directory (must not exist or be empty).")
  export.define_format_flags(flags)  # export: --formats, --max-length, --platforms
  flags.DEFINE_list("draft-tokens", ["2", "3", "4", "6"], "draft: tokens drafted per round tried.")
  flags.DEFINE_integer("sample", 32, "draft: validation examples decoded per candidate.")


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


def _mode(f, positional) -> str:
  if len(positional) > 1 or (positional and f.mode and positional[0] != f.mode):
    raise st.AssemblyError(f"unexpected arguments {positional}; give one mode of {MODES}")
  mode = positional[0] if positional else f.mode or "plan"
  if mode not in MODES:
    raise st.AssemblyError(f"unknown mode {mode!r}; use one of {MODES}")
  return mode


def _dispatch(f, cfg, args) -> None:
  mode = _mode(f, args)
  if mode == "export":
    if not (f.bank and f.plan and f.out):
      raise st.AssemblyError("export needs --bank, --plan (a saved name or JSON file) and --out")
    export.export_from_flags(f)
    return
  if mode == "draft":
    _draft(f, cfg)
    return
  shapes = st.Shapes(f.batch, f["input-length"].value, f["max-new-tokens"].value)
  timing = dict(shapes=shapes, runs=f.runs, warmup=f.warmup, seed=f.seed)
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


def _draft(f, cfg) -> None:
  if _target(f) is not None:
    raise st.AssemblyError("draft takes no target: it picks the fastest draft it measures")
  try:
    ks = [int(k) for k in f["draft-tokens"].value]
  except ValueError:
    raise st.AssemblyError(
      f"--draft-tokens {','.join(f['draft-tokens'].value)}: give integers such as 2,3,4,6"
    ) from None
  record = assemble_draft(
    f.bank,
    cfg,
    name=f.name or "draft",
    overwrite=f.overwrite,
    plan=f.plan,
    draft_tokens=ks,
    batch=f.batch,
    sample=f.sample,
    runs=f.runs,
    warmup=f.warmup,
  )
  print(drafting.markdown_table(record))
  if record["saved"]:
    keys = ("name", "draft", "draft_tokens", "speedup_vs_greedy", "acceptance_rate")
    print(json.dumps({k: record[k] for k in keys}))
  else:
    print(
      "no draft beats plain greedy decoding on this device for this sample; nothing saved "
      "(try --batch 1, other --draft-tokens, or a better-trained bank)"
    )


def main(config, *args: str) -> None:
  """The command (module docstring): ``args`` is the mode, ``config`` the optional --config."""
  from absl import flags

  _dispatch(flags.FLAGS, config, list(args))


if __name__ == "__main__":
  from absl import flags

  from modjax.core import cli

  _define_flags(flags)
  cli.run(main, config="optional", positional=True)
