"""Wall-clock timing on this device: the project's one timing primitive.

Every timed call is waited for (``jax.block_until_ready`` on what it returns), warm-up calls are
untimed, and several candidates are timed in interleaved rounds (a, b, c, a, b, c, ...) so that
a shared machine's drift hits each alike; compare candidates by the medians of one such run.
``assemble``'s measured targets (``methods.modular.latency``) and the benchmarks
(``benchmarks/harness.py``) both time with it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import jax

K = TypeVar("K")


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  """(what ``fn()`` returned, ready; wall seconds of the call)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def seconds(fn: Callable[[], object]) -> float:
  """Wall seconds of one call of ``fn``, waited for."""
  return timed(fn)[1]


def repeat(fn: Callable[[], object], runs: int, warmup: int = 0) -> list[float]:
  """Seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  return [seconds(fn) for _ in range(runs)]


def interleaved(
  fns: Mapping[K, Callable[[], object]],
  rounds: int,
  *,
  calls: int | Mapping[K, int] = 1,
  warmup: int = 0,
  pause: float = 0.0,
) -> dict[K, list[float]]:
  """Seconds of every call of each candidate: ``warmup`` untimed calls of each, then
  ``rounds`` rounds, each timing ``calls`` consecutive calls (one count, or one per candidate)
  of every candidate in turn, in the order of ``fns``; ``pause`` seconds of sleep after each
  candidate's calls (one runtime's idle threads can spin on and slow the next one's)."""
  counts = calls if isinstance(calls, Mapping) else dict.fromkeys(fns, calls)
  for fn in fns.values():
    repeat(fn, 0, warmup)
  out = {key: [] for key in fns}
  for _ in range(rounds):
    for key, fn in fns.items():
      out[key] += repeat(fn, counts[key])
      if pause:
        time.sleep(pause)
  return out


def median(samples: Sequence[float]) -> float:
  return float(statistics.median(samples))
