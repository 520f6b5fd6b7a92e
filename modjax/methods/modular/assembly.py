"""Assembled plans: a tiling of each stack by original layers and aligned modules.

A tiling of a stack with L original layers is a list of spans ``(start, end)`` that cover
``0 .. L`` in order without gaps or overlaps. A span of one layer is that original block; a span
of ``g > 1`` layers is module ``m{g}.{start // g}``, so it must start at a multiple of g and the
bank must hold modules of granularity g for that stack. Every assembled plan is a plain stack of
blocks: it compiles to its own static graph and exports like any model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from modjax.core.plan import Plan, PlanError, Slot
from modjax.methods.modular.modules import bank_granularities, module_name, num_layers


def _bounds(stack: str, span, layers: int) -> tuple[int, int]:
  if (
    not isinstance(span, (tuple, list))
    or len(span) != 2
    or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
  ):
    raise PlanError(f"{stack} span {span!r} is not a pair of integers (start, end)")
  start, end = span
  if not 0 <= start < end <= layers:
    raise PlanError(f"{stack} span {tuple(span)} is outside 0..{layers} or empty; use start < end")
  return start, end


def span_block(stack: str, span, granularities: Sequence[int], layers: int) -> str:
  """The block name standing for ``span`` in ``stack``, or a PlanError saying why none does."""
  start, end = _bounds(stack, span, layers)
  g = end - start
  if g == 1:
    return str(start)
  if g not in granularities:
    raise PlanError(
      f"{stack} span {tuple(span)} needs a module of granularity {g}, which the bank lacks "
      f"(it has {list(granularities)}); split the span into original layers or coarser modules"
    )
  if start % g:
    raise PlanError(
      f"{stack} span {tuple(span)} is misaligned: modules of granularity {g} start at multiples "
      f"of {g}; use ({start - start % g}, {start - start % g + g})"
    )
  return module_name(g, start // g)


def stack_slots(stack: str, spans, granularities: Sequence[int], layers: int) -> tuple[Slot, ...]:
  """Slots of one stack from its tiling (validated: in order, no gaps, no overlaps, full)."""
  if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence) or not spans:
    raise PlanError(f"{stack} tiling must be a non-empty list of (start, end) spans, got {spans!r}")
  slots, covered = [], 0
  for span in spans:
    start, end = _bounds(stack, span, layers)
    if start > covered:
      raise PlanError(f"{stack} tiling leaves layers {covered}..{start - 1} uncovered")
    if start < covered:
      raise PlanError(
        f"{stack} span {tuple(span)} overlaps layers before {covered}; spans must be in order "
        "and disjoint"
      )
    slots.append(Slot(span_block(stack, span, granularities, layers)))
    covered = end
  if covered != layers:
    raise PlanError(f"{stack} tiling stops at layer {covered}; cover all {layers} layers")
  return tuple(slots)


def tiling_plan(model, spans_by_stack: Mapping, *, meta: Mapping) -> Plan:
  """The plan of a per-stack tiling (``{"decoder": [(0, 3), (3, 4), (4, 6)]}``); stacks left
  out keep their original layers. ``meta`` (the bank's metadata) says which modules exist."""
  unknown = sorted(set(spans_by_stack) - set(model.stacks))
  if unknown:
    raise PlanError(f"tiling for unknown stacks {unknown}; the model has {model.stacks}")
  stacks = {}
  for stack in model.stacks:
    layers = num_layers(model, stack)
    spans = spans_by_stack.get(stack, [(i, i + 1) for i in range(layers)])
    stacks[stack] = stack_slots(stack, spans, bank_granularities(meta, stack), layers)
  return Plan(**stacks)


def all_g_plan(model, granularity, *, meta: Mapping) -> Plan:
  """Every slot of a stack at one granularity: ``granularity`` is one int for every stack or
  ``{stack: g}`` (stacks left out keep their original layers; g = 1 means original layers)."""
  if isinstance(granularity, Mapping):
    per_stack = dict(granularity)
  else:
    per_stack = {s: granularity for s in model.stacks}
  spans = {}
  for stack, g in per_stack.items():
    if stack not in model.stacks:
      raise PlanError(f"granularity for unknown stack {stack!r}; the model has {model.stacks}")
    layers = num_layers(model, stack)
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or layers % g:
      raise PlanError(f"{stack} granularity {g!r} does not divide its {layers} layers")
    spans[stack] = [(i, i + g) for i in range(0, layers, g)]
  return tiling_plan(model, spans, meta=meta)
