"""The progress helper of the non-training loops (``modjax.core.progress``): when it writes a line and
what the line says (count, rate, ETA, note), on a clock the test advances."""

import logging

import pytest

from modjax.core.progress import Progress, format_duration, format_rate


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def _progress(total, **kw):
  clock = _Clock()
  logger = logging.getLogger("modjax.test_progress")
  return Progress("scored", total, "plans", logger=logger, clock=clock, **kw), clock


def test_first_update_then_every_interval_then_the_last(caplog):
  progress, clock = _progress(total=5, every_secs=10)
  written = []
  with caplog.at_level(logging.INFO, logger="modjax"):
    for _ in range(5):  # 5 s per plan: a line at 1, 10 s later (3), and at the last
      clock.now += 5
      written.append(progress.update(note=f"plan {progress.done + 1:.0f}"))
  assert written == [True, False, True, False, True]
  assert caplog.messages == [
    "scored 1/5 plans (0.2 plans/s, ETA 0:00:20): plan 1",
    "scored 3/5 plans (0.2 plans/s, ETA 0:00:10): plan 3",
    "scored 5/5 plans (0.2 plans/s, ETA 0:00:00): plan 5",
  ]


def test_every_update_when_the_interval_is_zero(caplog):
  progress, clock = _progress(total=3, every_secs=0)
  with caplog.at_level(logging.INFO, logger="modjax"):
    for _ in range(3):
      clock.now += 1
      progress.update()
  assert len(caplog.messages) == 3 and caplog.messages[1].startswith("scored 2/3 plans (1 plans/s")


def test_absolute_counts_an_overshoot_and_an_unknown_total(caplog):
  progress, clock = _progress(total=10_000, every_secs=60)
  with caplog.at_level(logging.INFO, logger="modjax"):
    clock.now += 2
    progress.update(done=4_620, note="batch 1")
    clock.now += 2
    assert not progress.update(done=9_000)  # within the interval
    clock.now += 1
    assert progress.update(done=11_500)  # past the total: always written
  assert caplog.messages[0] == "scored 4,620/10,000 plans (2,310 plans/s, ETA 0:00:02): batch 1"
  assert caplog.messages[1] == "scored 11,500/10,000 plans (2,300 plans/s, ETA 0:00:00)"

  caplog.clear()
  unknown, clock = _progress(total=None)
  with caplog.at_level(logging.INFO, logger="modjax"):
    clock.now += 4
    unknown.update(advance=6)
  assert caplog.messages == ["scored 6 plans (1.5 plans/s)"]  # no total, no ETA


def test_formats_and_a_bad_interval():
  assert format_duration(187.4) == "0:03:07"
  assert format_duration(26 * 3600 + 3 * 60 + 4) == "1 day, 2:03:04"
  assert format_duration(-5) == "0:00:00"
  assert format_rate(2309.6) == "2,310" and format_rate(0.5234) == "0.523"
  with pytest.raises(ValueError, match="every_secs=-1 is negative"):
    Progress("x", 1, "items", every_secs=-1)
