"""The main job's choice of the plan it exports from a sweep (the whole pipeline runs in CI as
the README's first command)."""

from modjax.pipeline import choose_export


def _row(strategy, speedup, pareto=True):
  return {"strategy": strategy, "measured_speedup": speedup, "pareto": pareto}


def test_export_picks_the_fastest_front_plan_within_the_bound_never_the_teacher():
  rows = [
    _row("teacher", 1.0),
    _row("size-first", 1.3),
    _row("speed-first", 1.9),
    _row("speed-first", 2.0, pareto=False),
    _row("speed-first", 3.1),
  ]
  assert choose_export({"plans": rows}, 2.0) == rows[2]
  assert choose_export({"plans": rows}, 1.1) == rows[1]  # nothing within: the slowest front plan
  assert choose_export({"plans": rows[:1]}, 2.0) is None
