"""Timing assembled plans on this device, and the plan a measured target picks.

The workload is :class:`~.strategies.Shapes`: ``batch`` rows of ``input_length`` seeded random
tokens (no padding) decoded greedily for exactly ``max_new_tokens`` tokens: EOS is disabled
(``eos_id=-1``) so every plan runs the same number of steps whatever its weights predict. Per
plan: the plan's entries only (``bank.subset``, what an export of it holds), one call that
compiles, ``warmup`` more calls, then ``runs`` timed calls, each waited for
(:mod:`modjax.core.timing`); the plan's time is their median. The teacher is timed the same way in
the same process, interleaved with each plan (teacher, plan, teacher, plan, ...: both see the
same machine load), and a speed-up is the teacher's median over the plan's. Latency per token is
the median over ``max_new_tokens``; per sequence it is the whole batched ``generate`` call
(every row of the batch is one sequence, all finished together).

Timings decide which plan is chosen; they are noisy, and nothing here assumes they are
monotone along a ladder beyond the walk described in :func:`select_measured`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from modjax import decoding
from modjax.core import timing
from modjax.core.plan import Plan
from modjax.core.progress import Progress
from modjax.methods.modular import strategies as st
from modjax.models import bank

log = logging.getLogger("modjax.assemble")


@dataclasses.dataclass(frozen=True)
class Timing:
  seconds: float  # median of the timed calls
  samples: tuple[float, ...]
  max_new_tokens: int

  @property
  def per_token_ms(self) -> float:
    return 1e3 * self.seconds / self.max_new_tokens

  @property
  def per_sequence_ms(self) -> float:
    return 1e3 * self.seconds

  def ms(self, per: str) -> float:
    return self.per_token_ms if per == "token" else self.per_sequence_ms


class Timer:
  """Times plans of one bank at one workload, each plan once (results are cached)."""

  def __init__(self, model, params, shapes=st.DEFAULT_SHAPES, *, runs=5, warmup=1, seed=0):
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
      raise st.AssemblyError(f"runs must be a positive integer, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
      raise st.AssemblyError(f"warmup must be an integer >= 0, got {warmup!r}")
    self.model, self.params, self.shapes = model, params, shapes
    self.runs, self.warmup = runs, warmup
    vocab = model.config.vocab_size
    ids = np.random.default_rng(seed).integers(2, vocab, (shapes.batch, shapes.input_length))
    self.ids = jnp.asarray(ids, jnp.int32)
    self.mask = jnp.ones_like(self.ids)
    self.prepared = decoding.prepare(model, params)
    self.teacher = model.identity_plan()
    self.cache: dict[Plan, Timing] = {}
    self.calls: dict = {}
    self.reference: dict[Plan, float] = {}  # the teacher's median, interleaved with a plan

  def _call(self, plan: Plan):
    """A compiled, warmed-up call decoding the workload with ``plan``'s entries."""
    if plan in self.calls:
      return self.calls[plan]
    params = bank.subset(self.params, plan, self.model.stacks)

    def call():
      return decoding.generate(
        self.model,
        params,
        plan,
        self.ids,
        self.mask,
        max_new_tokens=self.shapes.max_new_tokens,
        eos_id=-1,
        prepared=self.prepared,
        scores=False,  # tokens only: no log-softmax per token
      ).tokens

    timing.repeat(call, 0, warmup=1 + self.warmup)
    self.calls[plan] = call
    return call

  def measure(self, plan: Plan) -> Timing:
    """The plan's timing; a plan other than the teacher is timed interleaved with the teacher
    (teacher, plan, teacher, plan, ...) so both see the same machine load, and its speed-up
    compares the two medians of that interleaving."""
    if plan in self.cache:
      return self.cache[plan]
    call = self._call(plan)
    if plan == self.teacher:
      samples = timing.repeat(call, self.runs)
    else:
      pairs = timing.interleaved({"teacher": self._call(self.teacher), "plan": call}, self.runs)
      samples = pairs["plan"]
      self.reference[plan] = timing.median(pairs["teacher"])
    result = Timing(timing.median(samples), tuple(samples), self.shapes.max_new_tokens)
    self.cache[plan] = result
    return result

  def speedup(self, plan: Plan) -> float:
    """The teacher's median over the plan's, timed interleaved (exactly 1 for the teacher)."""
    if plan == self.teacher:
      return 1.0
    timing = self.measure(plan)
    return self.reference[plan] / timing.seconds

  def latency_ms(self, plan: Plan, per: str) -> float:
    return self.measure(plan).ms(per)


def time_all(timer: Timer, plans: Sequence[Plan], what: str = "plans") -> list[Timing]:
  """Times every plan (teacher first, so speed-ups have their reference), with a progress line
  (N/M, rate, ETA) per plan."""
  timer.measure(timer.teacher)
  out, progress = [], Progress("timed", len(plans), what, logger=log, every_secs=0)
  for plan in plans:
    out.append(timer.measure(plan))
    speed = f"{timer.speedup(plan):.2f}x, {out[-1].per_token_ms:.2f} ms/token"
    progress.update(note=f"{speed}  {plan.describe()}")
  return out


@dataclasses.dataclass(frozen=True)
class Selection:
  candidate: st.Candidate
  speedup: float  # measured
  timing: Timing
  timed: int  # plans timed besides the teacher


def _measured(timer: Timer, c: st.Candidate, target) -> float:
  if isinstance(target, st.Speedup):
    return timer.speedup(c.plan)
  return timer.latency_ms(c.plan, target.per)


def _meets(value: float, target) -> bool:
  if isinstance(target, st.Speedup):
    return value >= target.factor
  return value <= target.ms


def _describe(value: float, target) -> str:
  return f"{value:.2f}x" if isinstance(target, st.Speedup) else f"{value:.2f} ms/{target.per}"


def _start(candidates, target, timer) -> int:
  """The first rung the cost model expects to meet ``target``."""
  teacher = candidates[0]
  for i, c in enumerate(candidates):
    ratio = st.estimated_speedup(c, teacher)
    if isinstance(target, st.Speedup) and ratio >= target.factor:
      return i
    if isinstance(target, st.Latency):
      if timer.latency_ms(teacher.plan, target.per) / ratio <= target.ms:
        return i
  return len(candidates) - 1


def select_measured(candidates: Sequence[st.Candidate], target, timer: Timer, *, max_timed=8):
  """The least compressed rung of ``candidates`` (a ladder) whose MEASURED speed-up or latency
  meets ``target``.

  Times the teacher and the last rung first: when even the last rung misses the target, an
  AssemblyError names what the bank reaches here. Then, starting from the first rung the cost
  model expects to meet the target, walks the ladder: back towards the teacher while rungs still
  meet it, forward while they do not, timing at most ``max_timed`` rungs; the least compressed
  rung seen to meet the target wins (the last rung when the walk runs out)."""
  st.check_target(target)
  if not isinstance(target, (st.Speedup, st.Latency)):
    raise st.AssemblyError("select_measured takes a Speedup or Latency target")
  last = len(candidates) - 1
  values = {0: _measured(timer, candidates[0], target)}
  if _meets(values[0], target):
    return _selection(candidates, 0, timer, 0)
  values[last] = _measured(timer, candidates[last], target)
  if not _meets(values[last], target):
    what = _describe(values[last], target)
    if isinstance(target, st.Speedup):
      raise st.AssemblyError(
        f"--speedup {target.factor:g} is above what this bank reaches on this device: its most "
        f"compressed plan measures {what}; ask for at most {values[last]:.2f}"
      )
    raise st.AssemblyError(
      f"no plan meets --latency-ms {target.ms:g} per {target.per} on this device: the fastest "
      f"(most compressed) measures {what}; ask for more, or a smaller --batch or shorter lengths"
    )
  best, timed = last, 0
  i = min(max(_start(candidates, target, timer), 1), last)

  def probe(k):
    nonlocal timed
    if k not in values:
      timed += 1
      values[k] = _measured(timer, candidates[k], target)
      log.info(
        "timed rung %d/%d (%d of at most %d): %s",
        k,
        last,
        timed,
        max_timed,
        _describe(values[k], target),
      )
    return _meets(values[k], target)

  if i < last and timed < max_timed and probe(i):
    best = i
    while i > 1 and timed < max_timed and probe(i - 1):
      i -= 1
      best = i
  else:
    while i + 1 < last and timed < max_timed:
      i += 1
      if probe(i):
        best = i
        break
  return _selection(candidates, best, timer, timed)


def _selection(candidates, index, timer, timed) -> Selection:
  c = candidates[index]
  return Selection(c, timer.speedup(c.plan), timer.measure(c.plan), timed)
