"""Progress of the long loops other than training: done/total, rate and ETA on one log line.

Training reports through clu's writers and periodic actions (``modjax.train.reporting``); every
other long loop (decoding examples, scoring or timing plans, collecting FFN features) uses one
:class:`Progress`::

  progress = Progress("scored", len(plans), "plans", logger=log, every_secs=0)
  for plan in plans:
    loss = quality.loss(plan)
    progress.update(note=f"loss {loss:.4f}  {plan.describe()}")

logs ``scored 3/12 plans (0.52 plans/s, ETA 0:00:17): loss 2.3140  ...``. A line is written at
the first update, then at most every ``every_secs`` seconds (0: at every update), and always at
the one that reaches ``total``. The rate is the mean since the loop started, so the first item's
compilation is spread over the run rather than dominating one window.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable

_LOG = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
  """``0:03:07``; past a day ``1 day, 2:03:04`` (``datetime.timedelta``'s form)."""
  return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def format_rate(per_second: float) -> str:
  """``2,310`` for large rates, three significant digits below 100 (``0.523``, ``12.4``)."""
  return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


class Progress:
  """Counts work done towards ``total`` (None: unknown, no ETA) in ``unit`` and logs it.

  ``label`` starts each line (``"decoded"``, ``"timed"``, ``"ffn features"``); ``logger`` is
  the caller's (so the line carries its module); ``clock`` is a monotonic time in seconds."""

  def __init__(
    self,
    label: str,
    total: float | None,
    unit: str,
    *,
    every_secs: float = 10.0,
    logger: logging.Logger | None = None,
    clock: Callable[[], float] = time.monotonic,
  ):
    if every_secs < 0:
      raise ValueError(f"every_secs={every_secs} is negative; use 0 (every update) or more")
    self.label, self.total, self.unit, self.every_secs = label, total, unit, every_secs
    self.logger = logger or _LOG
    self.clock = clock
    self.done = 0.0
    self.start = clock()
    self._last_logged: float | None = None

  def update(self, advance: float = 1, *, done: float | None = None, note: str = "") -> bool:
    """Adds ``advance`` units (or sets the count to ``done``); logs when due, with ``note``
    after the numbers. Returns whether a line was written."""
    self.done = self.done + advance if done is None else done
    now = self.clock()
    finished = self.total is not None and self.done >= self.total
    due = self._last_logged is None or now - self._last_logged >= self.every_secs
    if not (finished or due):
      return False
    self._last_logged = now
    self.logger.info("%s", self.line(now, note))
    return True

  def line(self, now: float, note: str = "") -> str:
    """``decoded 24/64 examples (3.1 examples/s, ETA 0:00:13): note``."""
    rate = self.done / max(now - self.start, 1e-9)
    count = f"{self.done:,.0f}" if self.total is None else f"{self.done:,.0f}/{self.total:,.0f}"
    stats = f"{format_rate(rate)} {self.unit}/s"
    if self.total is not None and rate > 0:
      stats += f", ETA {format_duration(max(self.total - self.done, 0) / rate)}"
    return f"{self.label} {count} {self.unit} ({stats})" + (f": {note}" if note else "")
