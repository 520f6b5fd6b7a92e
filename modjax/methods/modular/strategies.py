"""Assembly strategies: which tiling of a module bank meets a budget.

A module bank holds, per stack of L original layers, modules ``m{g}.{j}`` for each granularity g
(``.modules``); an assembled plan tiles each stack with original layers and aligned modules
(``.assembly``). Everything here is a pure, deterministic function of the model (its config),
the bank's entry metadata (which modules exist) and a target: no parameters and no device, so
thousands of plans can be costed (``modjax.models.cost``) before anything is compiled. Timing plans on
a device is ``.latency``; scoring them on data is ``.sweep``.

**Ladders.** A strategy orders plans from the teacher (first rung) to the most compressed one
(last rung: every stack at its coarsest granularity); each rung is at most as deep as the one
before in every stack, so parameters and decoding cost never increase along a ladder. A target
picks the FIRST rung that meets it: the least compressed plan within the budget.

Each stack is compressed **top-down and fine-to-coarse** (R): its ladder is
``tilings.top_down_ladder``, whose docstring writes the exact order down. Strategies combine the
two stacks' ladders:

* ``speed-first``: the decoder's ladder first (autoregressive decoding runs the decoder once per
  generated token and dominates latency), then the encoder's with the decoder at its coarsest.
* ``size-first``: both stacks alike by parameter count: each step advances the stack that keeps
  the larger fraction of its teacher parameters (a tie goes to the decoder), so the two shrink in
  step (L=6 + 6: dec, enc, dec, enc, ...).
* ``random`` (the ablation, seeded): each step picks a stack at random among those not yet at
  their minimum depth, lowers its depth to the next reachable one and draws that stack's tiling
  uniformly among all tilings of the new depth (independently of its previous tiling).

Tilings are counted, enumerated and sampled exactly (``.tilings``); :func:`search_candidates`
bounds what it returns by the cost model (see there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from modjax.core.plan import Plan
from modjax.methods.modular.assembly import tiling_plan
from modjax.methods.modular.modules import bank_granularities, num_layers
from modjax.methods.modular.tilings import (
  AssemblyError,
  Tiling,
  count_tilings,
  depths,
  enumerate_tilings,
  identity,
  one_per_depth,
  random_tiling,
  top_down_ladder,
)
from modjax.models import cost as cost_model

STRATEGIES = ("speed-first", "size-first", "random")
LATENCY_PER = ("token", "sequence")
# Ratio of FLOPs to bytes at which one decoding step turns compute-bound in the estimate (R):
# a nominal CPU ridge point; the estimate only ranks plans, the device measures them.
FLOPS_PER_BYTE = 10.0

# ---- targets and shapes -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Params:
  """At most ``fraction`` of the teacher's parameters (``cost.plan_cost(...).params_total``:
  the entries the plan uses, not the whole bank)."""

  fraction: float


@dataclasses.dataclass(frozen=True)
class Speedup:
  """Decoding at least ``factor`` times faster than the teacher (pure functions use the cost
  model's estimate; ``latency.select_measured`` measures)."""

  factor: float


@dataclasses.dataclass(frozen=True)
class Latency:
  """At most ``ms`` milliseconds per generated token or per batched ``generate`` call
  (``per="sequence"``), measured on this device (``latency.select_measured``)."""

  ms: float
  per: str = "token"


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The decoding workload plans are costed and timed at: ``batch`` rows of ``input_length``
  encoder tokens, ``max_new_tokens`` generated tokens per row (greedy)."""

  batch: int = 1
  input_length: int = 64
  max_new_tokens: int = 32

  def __post_init__(self):
    for name in ("batch", "input_length", "max_new_tokens"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AssemblyError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


DEFAULT_SHAPES = Shapes()


def check_target(target) -> None:
  """Rejects targets that no bank can meet, before anything is costed or timed."""
  if isinstance(target, Params):
    if not 0.0 < target.fraction <= 1.0:
      raise AssemblyError(
        f"--params {target.fraction:g} is outside (0, 1]; give a fraction of the teacher's "
        "parameters such as 0.5"
      )
  elif isinstance(target, Speedup):
    if target.factor < 1.0:
      raise AssemblyError(
        f"--speedup {target.factor:g} is below 1: the teacher itself is 1x; ask for 1 or more"
      )
  elif isinstance(target, Latency):
    if target.ms <= 0:
      raise AssemblyError(f"--latency-ms {target.ms:g} must be positive")
    if target.per not in LATENCY_PER:
      raise AssemblyError(f"--latency-per {target.per!r} is unknown; use one of {LATENCY_PER}")
  else:
    raise AssemblyError(f"unknown target {target!r}; use Params, Speedup or Latency")


# ---- plans and their costs ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A plan with its per-stack tilings and its cost at the workload's shapes."""

  plan: Plan
  tilings: Mapping[str, Tiling]
  cost: cost_model.Cost

  @property
  def depths(self) -> dict[str, int]:
    return {s: len(t) for s, t in self.tilings.items()}


def granularities_of(model, meta: Mapping) -> dict[str, tuple[int, ...]]:
  """``{stack: granularities}`` of the bank's modules; an error when it has none at all."""
  found = {s: bank_granularities(meta, s) for s in model.stacks}
  if not any(found.values()):
    raise AssemblyError(
      "the bank holds no modules (no entry metadata with a granularity); train a module bank "
      "first: python -m modjax.train --config configs/modular_t5.py:<recipe>"
    )
  return found


def make_candidate(model, meta: Mapping, tilings: Mapping[str, Tiling], shapes: Shapes):
  plan = tiling_plan(model, {s: list(t) for s, t in tilings.items()}, meta=meta)
  c = cost_model.plan_cost(
    model,
    plan,
    batch=shapes.batch,
    input_length=shapes.input_length,
    target_length=shapes.max_new_tokens,
  )
  return Candidate(plan, dict(tilings), c)


def estimated_cost(c: cost_model.Cost) -> float:
  """Byte-equivalents of one batched ``generate`` call (R): the prefill's FLOPs, plus per
  generated token the larger of the step's FLOPs and its bytes, FLOPs counted at
  :data:`FLOPS_PER_BYTE`. A ranking of plans, not a prediction of seconds."""
  step = max(c.decode_step_flops() / FLOPS_PER_BYTE, c.decode_step_bytes())
  return c.prefill_flops / FLOPS_PER_BYTE + c.target_length * step


def estimated_speedup(candidate: Candidate, teacher: Candidate) -> float:
  return estimated_cost(teacher.cost) / estimated_cost(candidate.cost)


def params_fraction(candidate: Candidate, teacher: Candidate) -> float:
  return candidate.cost.params_total / teacher.cost.params_total


def _stack_ladders(model, meta) -> dict[str, list[Tiling]]:
  gs = granularities_of(model, meta)
  return {s: top_down_ladder(num_layers(model, s), gs[s]) for s in model.stacks}


def _walk(model, meta, shapes, ladders, choose_stack: Callable) -> list[Candidate]:
  """Candidates from per-stack ladders: start at every stack's first rung; each step advances
  the stack ``choose_stack(index, candidate)`` names, until every stack is at its last rung."""
  index = {s: 0 for s in ladders}
  current = make_candidate(model, meta, {s: ladders[s][0] for s in ladders}, shapes)
  out = [current]
  while any(index[s] < len(ladders[s]) - 1 for s in ladders):
    stack = choose_stack(index, current)
    index[stack] += 1
    current = make_candidate(model, meta, {s: ladders[s][index[s]] for s in ladders}, shapes)
    out.append(current)
  return out


def ladder(model, meta: Mapping, strategy: str, *, shapes=DEFAULT_SHAPES, seed: int = 0):
  """The strategy's candidates, teacher first, most compressed last (module docstring)."""
  if strategy not in STRATEGIES:
    raise AssemblyError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
  ladders = _stack_ladders(model, meta)
  open_ = lambda index: [s for s in ladders if index[s] < len(ladders[s]) - 1]  # noqa: E731
  if strategy == "speed-first":
    order = [s for s in ("decoder", "encoder") if s in ladders]
    return _walk(model, meta, shapes, ladders, lambda i, c: next(s for s in order if s in open_(i)))
  if strategy == "size-first":
    teacher = make_candidate(model, meta, {s: ladders[s][0] for s in ladders}, shapes)
    full = teacher.cost.params_by_part

    def larger_fraction(index, c):
      kept = {s: c.cost.params_by_part[s] / full[s] for s in open_(index)}
      return max(sorted(kept, key=lambda s: s != "decoder"), key=kept.get)

    return _walk(model, meta, shapes, ladders, larger_fraction)
  return _random_ladder(model, meta, shapes, seed)


def _random_ladder(model, meta, shapes, seed: int) -> list[Candidate]:
  gs = granularities_of(model, meta)
  layers = {s: num_layers(model, s) for s in model.stacks}
  levels = {s: depths(layers[s], gs[s]) for s in model.stacks}
  rng = np.random.default_rng(seed)
  index = {s: 0 for s in model.stacks}
  tilings = {s: tuple((i, i + 1) for i in range(layers[s])) for s in model.stacks}
  out = [make_candidate(model, meta, tilings, shapes)]
  while True:
    open_ = [s for s in model.stacks if index[s] < len(levels[s]) - 1]
    if not open_:
      return out
    stack = open_[int(rng.integers(len(open_)))]
    index[stack] += 1
    depth = levels[stack][index[stack]]
    tilings = {**tilings, stack: random_tiling(layers[stack], gs[stack], depth, rng)}
    out.append(make_candidate(model, meta, tilings, shapes))


# ---- choosing a rung ----------------------------------------------------------------------------


def meets_estimate(candidate: Candidate, teacher: Candidate, target) -> bool:
  """Whether the cost model says ``candidate`` meets ``target`` (Params or Speedup)."""
  if isinstance(target, Params):
    return params_fraction(candidate, teacher) <= target.fraction + 1e-12
  if isinstance(target, Speedup):
    return estimated_speedup(candidate, teacher) >= target.factor - 1e-12
  raise AssemblyError(f"{type(target).__name__} targets are measured; use latency.select_measured")


def choose(candidates: Sequence[Candidate], target) -> Candidate:
  """The first rung meeting a Params target (exact) or a Speedup target (estimated by the cost
  model); an AssemblyError naming the reachable range when no rung does."""
  check_target(target)
  teacher = candidates[0]
  for c in candidates:
    if meets_estimate(c, teacher, target):
      return c
  last = candidates[-1]
  if isinstance(target, Params):
    reach = params_fraction(last, teacher)
    raise AssemblyError(
      f"--params {target.fraction:g} is below what this bank reaches: its smallest plan keeps "
      f"{reach:.3f} of the teacher's parameters; ask for {reach:.3f} or more"
    )
  reach = estimated_speedup(last, teacher)
  raise AssemblyError(
    f"--speedup {target.factor:g} is above the cost model's estimate for this bank's most "
    f"compressed plan ({reach:.2f}x); ask for at most {reach:.2f}"
  )


def assemble(model, meta: Mapping, strategy: str, target, *, shapes=DEFAULT_SHAPES, seed=0) -> Plan:
  """The plan ``strategy`` picks for ``target`` (Params, or Speedup by the cost model)."""
  return choose(ladder(model, meta, strategy, shapes=shapes, seed=seed), target).plan


# ---- search: candidates bounded by the cost model -----------------------------------------------


def pareto_front(items: Sequence, *keys: Callable) -> list:
  """Items no other item beats on every key (all minimised) with at least one strictly,
  sorted by the first key; exact duplicates on every key keep the first."""
  values = [tuple(k(x) for k in keys) for x in items]
  front = []
  for i, v in enumerate(values):
    dominated = any(
      all(a <= b for a, b in zip(w, v, strict=True)) and (w != v or j < i)
      for j, w in enumerate(values)
      if j != i
    )
    if not dominated:
      front.append(i)
  return [items[i] for i in sorted(front, key=lambda i: values[i])]


def thin(items: Sequence, count: int, key: Callable) -> list:
  """At most ``count`` items spread evenly over ``key`` (both ends kept)."""
  ordered = sorted(items, key=key)
  if len(ordered) <= count:
    return ordered
  picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, count)).astype(int))
  return [ordered[i] for i in picks]


def search_candidates(model, meta: Mapping, *, shapes=DEFAULT_SHAPES, max_candidates: int = 48):
  """Plans worth scoring, at most ``max_candidates``, teacher first.

  When the two stacks have at most ``max_candidates`` tiling pairs, all of them. Otherwise
  (R): every pair of depths (encoder depth, decoder depth), each stack tiled at that depth by
  its top-down fine-to-coarse ladder (or, for a depth the ladder skips, by its first tiling in
  enumeration order), plus the speed-first and size-first ladders; the cost model then keeps
  ``max_candidates`` spread evenly over the estimated cost (:func:`estimated_cost`)."""
  if max_candidates < 2:
    raise AssemblyError(f"max-candidates must be at least 2, got {max_candidates}")
  gs = granularities_of(model, meta)
  layers = {s: num_layers(model, s) for s in model.stacks}
  total = int(np.prod([count_tilings(layers[s], gs[s]) for s in model.stacks]))
  if total <= max_candidates:
    per_stack = [enumerate_tilings(layers[s], gs[s]) for s in model.stacks]
  else:
    per_stack = [one_per_depth(layers[s], gs[s]) for s in model.stacks]
  pairs = [dict(zip(model.stacks, combo, strict=True)) for combo in _product(per_stack)]
  found = {}
  for tilings in pairs:
    c = make_candidate(model, meta, tilings, shapes)
    found.setdefault(c.plan, c)
  if total > max_candidates:
    for strategy in ("speed-first", "size-first"):
      for c in ladder(model, meta, strategy, shapes=shapes):
        found.setdefault(c.plan, c)
  teacher = make_candidate(model, meta, {s: identity(layers[s]) for s in model.stacks}, shapes)
  rest = [c for p, c in found.items() if p != teacher.plan]
  kept = thin(rest, max_candidates - 1, key=lambda c: estimated_cost(c.cost))
  return [teacher] + sorted(kept, key=lambda c: -estimated_cost(c.cost))


def _product(lists):
  if not lists:
    yield ()
    return
  for head in lists[0]:
    for tail in _product(lists[1:]):
      yield (head, *tail)
