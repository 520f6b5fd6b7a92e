"""Where a merge acts, as a value: ``{stack: ((start, stop), ...)}``, half-open position ranges.

A merge shares one FFN per range (``[0, 2)`` and ``[3, 5)``: two shared FFNs, positions 2 and 5
keep their own); the layer-drop baseline removes every layer of every range. Ranges of one stack
must not overlap, and each stack has its own (a T5 may merge ``[0, 2)`` in the encoder and
``[2, 4)`` in the decoder). The command line spells them ``--start`` and ``--windows``
(:func:`parse_start`, :func:`parse_windows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from modjax.core.plan import Plan, PlanError

Windows = dict[str, tuple[tuple[int, int], ...]]


def windows_at(stacks: Iterable[str], start: int, k: int) -> Windows:
  """The same window ``[start, start + k)`` in every stack of ``stacks``."""
  return {s: ((start, start + k),) for s in stacks}


def _is_index(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_windows(plan: Plan, model_stacks: Sequence[str], windows: Mapping) -> Windows:
  """``windows`` sorted and checked against ``plan``: known stacks, integer ranges of at least one
  position inside the stack, no overlap. One-line PlanError otherwise."""
  out = {}
  if not windows or not any(windows.values()):
    raise PlanError("no window to merge or drop; give at least one range such as [0, 2)")
  for stack, ranges in windows.items():
    if stack not in model_stacks:
      raise PlanError(f"unknown stack {stack!r}; the model has {tuple(model_stacks)}")
    n = len(plan.stack(stack))
    checked = []
    for window in ranges:
      start, stop = window if len(window) == 2 else (None, None)
      if not (_is_index(start) and _is_index(stop)) or not 0 <= start < stop <= n:
        raise PlanError(
          f"{stack} window {list(window)} does not fit: a window is [start, stop) with "
          f"0 <= start < stop <= {n} (the {stack}'s slots)"
        )
      checked.append((start, stop))
    checked.sort()
    for (a, b), (c, d) in zip(checked, checked[1:], strict=False):
      if c < b:
        raise PlanError(f"{stack} windows [{a}, {b}) and [{c}, {d}) overlap; give disjoint ones")
    if checked:
      out[stack] = tuple(checked)
  return out


def window_sizes(windows: Mapping) -> list[int]:
  """The sizes of every range, in stack and position order."""
  return [b - a for ranges in windows.values() for a, b in ranges]


def common_start(windows: Mapping) -> int | None:
  """The start shared by every stack when each has exactly one window there, else None."""
  starts = {r[0][0] if len(r) == 1 else None for r in windows.values()}
  return starts.pop() if len(starts) == 1 else None


def label(windows: Mapping) -> str:
  """``encoder 0-2,3-5; decoder 1-3`` (ranges as start-stop)."""
  return "; ".join(f"{s} " + ",".join(f"{a}-{b}" for a, b in r) for s, r in windows.items())


def as_json(windows: Mapping) -> dict:
  return {s: [list(r) for r in ranges] for s, ranges in windows.items()}


def from_json(data: Mapping) -> Windows:
  return {s: tuple((int(a), int(b)) for a, b in ranges) for s, ranges in data.items()}


# ---- the command line ---------------------------------------------------------------------------


def parse_start(text: str, stacks: Sequence[str], k: int) -> str | Windows:
  """``--start``: ``auto``, one index for every stack (``2``), or one per stack
  (``encoder=0,decoder=2``); an index becomes the window ``[start, start + k)``."""
  text = str(text).strip()
  if text == "auto":
    return "auto"
  flag = f"--start {text!r} must be 'auto', a layer index such as 0, or encoder=0,decoder=2;"
  if "=" not in text:
    return windows_at(stacks, _index(text, flag), k)
  out = {}
  for item in text.split(","):
    stack, _, value = item.partition("=")
    stack = stack.strip()
    if stack not in stacks or stack in out:
      raise PlanError(
        f"{flag} {stack!r} is not one of the merged stacks {list(stacks)} or is given twice"
      )
    start = _index(value, flag)
    out[stack] = ((start, start + k),)
  return out


def parse_windows(values: Sequence[str], stacks: Sequence[str]) -> Windows:
  """``--windows`` (repeatable): ``0-2,3-5`` gives those ranges to every stack of ``stacks``,
  ``encoder:0-2`` to one stack; ``A-B`` is positions A..B-1 and ``A`` alone is ``A-(A+1)``."""
  out: dict[str, list] = {}
  for value in values:
    stack, sep, ranges = str(value).rpartition(":")
    targets = [stack.strip()] if sep else list(stacks)
    if sep and targets[0] not in stacks:
      raise PlanError(
        f"--windows {value!r}: {targets[0]!r} is not one of the merged stacks {list(stacks)}"
      )
    parsed = [_range(item, value) for item in ranges.split(",") if item.strip()]
    if not parsed:
      raise PlanError(f"--windows {value!r} names no range; write e.g. 0-2,3-5 or decoder:1-3")
    for target in targets:
      out.setdefault(target, []).extend(parsed)
  return {s: tuple(r) for s, r in out.items()}


def _range(item: str, value: str) -> tuple[int, int]:
  start, sep, stop = item.strip().partition("-")
  flag = f"--windows {value!r} (ranges such as 0-2,3-5 or decoder:1-3):"
  first = _index(start, flag)
  return (first, _index(stop, flag) if sep else first + 1)


def _index(text: str, flag: str) -> int:
  try:
    value = int(str(text).strip())
  except ValueError:
    raise PlanError(f"{flag} {text!r} is not a layer index") from None
  if value < 0:
    raise PlanError(f"{flag} {value} is negative; layer indices start at 0")
  return value
