"""Tilings of one stack of a module bank: counting, enumeration, sampling, and the top-down,
fine-to-coarse order the assembly strategies (``.strategies``) walk.

A tiling of a stack of L original layers is a tuple of spans ``(start, end)`` covering 0..L in
order; a span of one layer is that original block, a span of g > 1 layers is module
``m{g}.{start // g}`` and must start at a multiple of g (``.assembly`` validates this).

Counting and enumeration are exact by dynamic programming over (position, depth): for L=12 with
{2,3,4,6} there are 292 tilings per stack (85,264 two-stack plans), for L=6 with {2,3,6} 14;
:func:`enumerate_tilings` refuses beyond a limit, :func:`random_tiling` samples any depth
uniformly without enumerating.

**Top-down, fine-to-coarse (R).** The paper states the order (replace the top of the stack first,
prefer fine modules, coarsen as needed) but publishes no code; this is the exact order used here.
Start from the teacher's tiling [(0,1), (1,2), ..., (L-1,L)]; for each granularity g of the
stack in ascending order (a *pass*), for j = L/g - 1 down to 0, place module span
[j*g, (j+1)*g): spans of the tiling inside it are dropped; a span crossing its lower edge keeps
its part below the edge, re-tiled from the bottom up by the coarsest aligned pieces that fit
(modules of granularity < g, else original layers); the upper edge is never crossed, since every
span above it was placed earlier in the same pass. After pass g the stack is all-g. The stack's
ladder is the teacher's tiling followed by every tiling this process reaches that is shallower
than the last one kept (placing a coarse module over finer ones not aligned with it can keep the
depth or, for granularities like {4, 6}, briefly deepen the stack; such tilings are passed
through, not kept). For L=6, {2,3,6}: depths 6, 5, 4, 3 (all-2), 2 (all-3), 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from modjax.core.errors import UserError

Span = tuple[int, int]
Tiling = tuple[Span, ...]


class AssemblyError(UserError, ValueError):
  """A target or strategy that cannot be met with this bank (one line, naming the fix)."""


def _pieces(position: int, layers: int, granularities: Sequence[int]) -> list[int]:
  """Span lengths that may start at ``position``: 1 (an original layer) and every aligned g."""
  return [g for g in (1, *granularities) if position % g == 0 and position + g <= layers]


@functools.lru_cache(maxsize=64)
def _depth_counts(layers: int, granularities: tuple[int, ...]) -> tuple[dict[int, int], ...]:
  """``counts[pos][k]``: tilings of ``[pos, layers)`` with exactly k spans."""
  counts: list[dict[int, int]] = [{} for _ in range(layers)] + [{0: 1}]
  for pos in range(layers - 1, -1, -1):
    for g in _pieces(pos, layers, granularities):
      for k, n in counts[pos + g].items():
        counts[pos][k + 1] = counts[pos].get(k + 1, 0) + n
  return tuple(counts)


def count_tilings(layers: int, granularities: Sequence[int]) -> int:
  """Valid tilings of a stack of ``layers`` with modules of ``granularities``."""
  return sum(_depth_counts(layers, tuple(sorted(granularities)))[0].values())


def depths(layers: int, granularities: Sequence[int]) -> list[int]:
  """The stack depths (slot counts) some tiling reaches, deepest first."""
  return sorted(_depth_counts(layers, tuple(sorted(granularities)))[0], reverse=True)


def enumerate_tilings(layers: int, granularities: Sequence[int], *, limit: int = 10_000):
  """Every valid tiling of one stack, deepest first (then in lexicographic order). Refuses
  (AssemblyError) when there are more than ``limit``: enumeration stays bounded."""
  gs = tuple(sorted(granularities))
  total = count_tilings(layers, gs)
  if total > limit:
    raise AssemblyError(
      f"{total} tilings of {layers} layers with granularities {list(gs)} exceed the limit "
      f"{limit}; use search_candidates, which keeps one tiling per depth"
    )
  out: list[Tiling] = []

  def walk(pos, spans):
    if pos == layers:
      out.append(tuple(spans))
      return
    for g in _pieces(pos, layers, gs):
      walk(pos + g, spans + [(pos, pos + g)])

  walk(0, [])
  return sorted(out, key=lambda t: (-len(t), t))


def random_tiling(layers: int, granularities: Sequence[int], depth: int, rng) -> Tiling:
  """A tiling with ``depth`` spans drawn uniformly among all such tilings (``rng``: a numpy
  Generator)."""
  gs = tuple(sorted(granularities))
  counts = _depth_counts(layers, gs)
  if depth not in counts[0]:
    raise AssemblyError(f"no tiling of {layers} layers with {list(gs)} has depth {depth}")
  spans, pos, left = [], 0, depth
  while pos < layers:
    options = [g for g in _pieces(pos, layers, gs) if counts[pos + g].get(left - 1, 0)]
    weights = np.array([counts[pos + g][left - 1] for g in options], float)
    g = options[int(rng.choice(len(options), p=weights / weights.sum()))]
    spans.append((pos, pos + g))
    pos, left = pos + g, left - 1
  return tuple(spans)


def _fill(start: int, end: int, granularities: Sequence[int]) -> list[Span]:
  """``[start, end)`` tiled bottom-up by the coarsest aligned piece that fits at each point."""
  spans, pos = [], start
  while pos < end:
    g = max(g for g in _pieces(pos, end, granularities))
    spans.append((pos, pos + g))
    pos += g
  return spans


def _place(tiling: Sequence[Span], new: Span, granularities: Sequence[int]) -> list[Span]:
  """``tiling`` with module span ``new`` placed (see the module docstring)."""
  a, c = new
  finer = [g for g in granularities if g < c - a]
  out = [new]
  for s, e in tiling:
    if e <= a or s >= c:
      out.append((s, e))
      continue
    if s < a:
      out += _fill(s, a, finer)
    if e > c:
      out += _fill(c, e, finer)
  return sorted(out)


def top_down_ladder(layers: int, granularities: Sequence[int]) -> list[Tiling]:
  """One stack's tilings, teacher first, top-down and fine-to-coarse (module docstring, (R))."""
  tiling = [(i, i + 1) for i in range(layers)]
  ladder = [tuple(tiling)]
  for g in sorted(granularities):
    for j in reversed(range(layers // g)):
      tiling = _place(tiling, (j * g, (j + 1) * g), granularities)
      if len(tiling) < len(ladder[-1]):
        ladder.append(tuple(tiling))
  return ladder


def identity(layers: int) -> Tiling:
  """The teacher's tiling: every original layer on its own."""
  return tuple((i, i + 1) for i in range(layers))


def one_per_depth(layers: int, granularities) -> list[Tiling]:
  """One tiling per reachable depth, deepest first: the top-down ladder's, else the first."""
  chosen = {len(t): t for t in top_down_ladder(layers, granularities)}
  for depth in depths(layers, granularities):
    if depth not in chosen:
      chosen[depth] = first_of_depth(layers, tuple(sorted(granularities)), depth)
  return [chosen[d] for d in sorted(chosen, reverse=True)]


def first_of_depth(layers: int, gs: tuple[int, ...], depth: int) -> Tiling:
  """The lexicographically first tiling with ``depth`` spans (no enumeration)."""
  counts = _depth_counts(layers, gs)
  spans, pos, left = [], 0, depth
  while pos < layers:
    g = next(g for g in _pieces(pos, layers, gs) if counts[pos + g].get(left - 1, 0))
    spans.append((pos, pos + g))
    pos, left = pos + g, left - 1
  return tuple(spans)
