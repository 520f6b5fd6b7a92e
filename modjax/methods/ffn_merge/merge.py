"""Merging windows of FFNs into shared bank entries, and the layer-drop baseline.

``merge_window`` takes a (bank, plan) and a window of k consecutive positions of one stack. It
aligns the positions' FFNs to the reference (``"permute"``) or not (``"vanilla"``), averages them
into ONE new entry ``<stack>/ffns/<name>``, and returns a plan whose k slots point at it; nothing
else of the bank or the plan changes (norms stay in the blocks). Several slots naming one entry
are truly tied: it is stored once, and gradients from every position add up in it.
``merge_ranges`` merges several windows at once (``modjax.methods.ffn_merge.ranges``: disjoint
ranges per stack, each stack its own), each into its own entry.

``"drop"`` is the baseline: the plan loses every layer of the window (a window of k drops k
whole layers; :func:`drop_layers` takes any explicit list). Nothing is rounded: what is removed is
exactly the window, so drops of 1, 2 and 3 layers are three different plans.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from modjax.core.plan import Plan, PlanError, Slot
from modjax.methods.ffn_merge.align import align_window, reference_offset
from modjax.methods.ffn_merge.features import FeatureStats
from modjax.methods.ffn_merge.ranges import check_windows, windows_at
from modjax.models import bank

METHODS = ("permute", "vanilla", "drop")


def entry_name(start: int, k: int) -> str:
  """Default name of the entry merged from positions ``[start, start + k)``."""
  return f"merged.{start}-{start + k}"


def check_window(model, plan: Plan, stack: str, start: int, k: int) -> None:
  """One-line PlanError unless ``[start, start + k)`` lies inside ``stack``'s slots."""
  if stack not in model.stacks:
    raise PlanError(f"unknown stack {stack!r}; the model has {model.stacks}")
  n = len(plan.stack(stack))
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise PlanError(f"window size k={k!r} must be an integer in 1..{n} (the {stack}'s slots)")
  if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n - k:
    raise PlanError(f"{stack} window start {start!r} must be in 0..{n - k} for k={k}")


def position_ffn(params: Mapping, plan: Plan, stack: str, position: int):
  """The FFN parameters position ``position`` of ``stack`` runs (its shared entry or its own)."""
  return bank.slot_params(params[stack], plan.stack(stack)[position])["ffn"]


def average(trees):
  """Leafwise mean of identically shaped parameter trees, in the first tree's dtypes."""
  return jax.tree.map(
    lambda *xs: jnp.mean(jnp.stack([x.astype(jnp.float32) for x in xs]), 0).astype(xs[0].dtype),
    *trees,
  )


def merged_ffn(
  params: Mapping,
  plan: Plan,
  stack: str,
  start: int,
  k: int,
  *,
  method: str = "permute",
  stats: FeatureStats | None = None,
  reference: str = "first",
):
  """The average of the window's FFNs, aligned to the reference layer when ``method`` is
  ``"permute"`` (which needs ``stats`` with the reference-vs-other cross sums)."""
  ffns = [position_ffn(params, plan, stack, p) for p in range(start, start + k)]
  if method == "permute" and k > 1:
    if stats is None:
      raise PlanError("method='permute' needs feature statistics; pass stats=collect_stats(...)")
    ref = reference_offset(k, reference)
    corr = {i: stats.correlation(stack, start + ref, start + i) for i in range(k) if i != ref}
    ffns = align_window(ffns, ref, corr)
  elif method not in ("permute", "vanilla"):
    raise PlanError(f"merge method {method!r} is unknown; use 'permute' or 'vanilla'")
  return average(ffns)


def merge_window(
  model,
  params: Mapping,
  plan: Plan,
  stack: str,
  start: int,
  k: int,
  *,
  method: str = "permute",
  stats: FeatureStats | None = None,
  reference: str = "first",
  name: str | None = None,
) -> tuple[dict, Plan]:
  """(bank, plan) with positions ``[start, start + k)`` of ``stack`` merged (module docstring).

  ``method``: ``"permute"`` (aligned average), ``"vanilla"`` (plain average) or ``"drop"`` (the
  baseline: the bank is returned as is, the plan loses the window's k layers)."""
  bank.validate_plan(plan, params, model.stacks)
  check_window(model, plan, stack, start, k)
  reference_offset(k, reference)
  if method not in METHODS:
    raise PlanError(f"merge method {method!r} is unknown; use one of {METHODS}")
  if method == "drop":
    return dict(params), drop_window(model, params, plan, stack, start, k)
  name = name or entry_name(start, k)
  value = merged_ffn(params, plan, stack, start, k, method=method, stats=stats, reference=reference)
  params = bank.with_entry(params, stack, "ffns", name, value, model=model)
  slots = list(plan.stack(stack))
  for p in range(start, start + k):
    slots[p] = Slot(slots[p].block, ffn=name)
  return params, Plan(**{**_stacks(plan), stack: tuple(slots)})


def merge_ranges(
  model, params: Mapping, plan: Plan, windows: Mapping, *, method: str = "permute", **kw
) -> tuple[dict, Plan]:
  """(bank, plan) with every window of ``windows`` (``{stack: ((start, stop), ...)}``) merged
  into its own shared entry, or, for ``"drop"``, every layer of every window dropped. The
  statistics (``stats``, permute) must hold each window's reference-vs-other cross sums."""
  windows = check_windows(plan, model.stacks, windows)
  if method == "drop":
    bank.validate_plan(plan, params, model.stacks)
    return dict(params), drop_layers(model, params, plan, dropped_layers(windows))
  for stack, ranges in windows.items():
    for start, stop in ranges:
      params, plan = merge_window(model, params, plan, stack, start, stop - start, method=method,
                                  **kw)  # fmt: skip
  return params, plan


def merge_windows(
  model, params: Mapping, plan: Plan, starts: Mapping[str, int], k: int, **kw
) -> tuple[dict, Plan]:
  """One window of ``k`` per stack, at ``{stack: start}`` (same options as :func:`merge_ranges`)."""
  for stack, start in starts.items():
    check_window(model, plan, stack, start, k)
  windows = {s: windows_at((s,), start, k)[s] for s, start in starts.items()}
  return merge_ranges(model, params, plan, windows, **kw)


# ---- the layer-drop baseline --------------------------------------------------------------------


def dropped_layers(windows: Mapping) -> dict[str, tuple[int, ...]]:
  """``{stack: positions}``: every position of every window (what ``"drop"`` removes)."""
  return {s: tuple(p for a, b in ranges for p in range(a, b)) for s, ranges in windows.items()}


def drop_layers(model, params: Mapping, plan: Plan, layers: Mapping) -> Plan:
  """The plan without the positions ``layers[stack]`` (an explicit list per stack). One-line
  PlanError for a position outside the stack, one given twice, or a stack left empty."""
  bank.validate_plan(plan, params, model.stacks)
  stacks = _stacks(plan)
  for stack, positions in layers.items():
    if stack not in model.stacks:
      raise PlanError(f"unknown stack {stack!r}; the model has {model.stacks}")
    n = len(plan.stack(stack))
    positions = list(positions)
    bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n]
    if bad or len(set(positions)) != len(positions):
      raise PlanError(
        f"{stack} layers to drop {positions} must be distinct positions in 0..{n - 1}"
      )
    if len(positions) == n:
      raise PlanError(f"dropping {positions} would leave the {stack} without a layer; keep one")
    stacks[stack] = tuple(s for p, s in enumerate(plan.stack(stack)) if p not in set(positions))
  return Plan(**stacks)


def drop_window(model, params: Mapping, plan: Plan, stack: str, start: int, k: int) -> Plan:
  """The plan without the k whole layers ``[start, start + k)`` of ``stack``."""
  check_window(model, plan, stack, start, k)
  return drop_layers(model, params, plan, {stack: tuple(range(start, start + k))})


def _stacks(plan: Plan) -> dict:
  return {"encoder": plan.encoder, "decoder": plan.decoder}
