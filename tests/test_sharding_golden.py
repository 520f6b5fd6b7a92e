"""The shardings a t5-base-shaped model gets (parameters and activation constraints) on 8 and
32 devices in the data, fsdp and tensor layouts (``sharding_layouts.py``) equal the committed
golden files in ``tests/golden/``: a change to the rules table, the mesh or the constraints
shows here, not first on a pod.

After an intended change, regenerate and commit the files:

    MODJAX_REGENERATE_GOLDEN=1 python -m pytest -q tests/test_sharding_golden.py
"""

import difflib
import json
import os
import subprocess
import sys

import jax
import pytest
from sharding_layouts import record, to_text
from train_helpers import REPO, subprocess_env

GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
REGENERATE = os.environ.get("MODJAX_REGENERATE_GOLDEN") == "1"
REGENERATE_COMMAND = "MODJAX_REGENERATE_GOLDEN=1 python -m pytest -q tests/test_sharding_golden.py"
SUBPROCESS_TIMEOUT_S = 300
MAX_DIFF_LINES = 80


def _recorded_text(device_count: int) -> str:
  """The record for ``device_count`` devices: in this process when it has that many, else in a
  subprocess with that many fake CPU devices."""
  if jax.device_count() >= device_count:
    return to_text(record(device_count))
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, "tests", "sharding_layouts.py"), str(device_count)],
    cwd=REPO,
    env=subprocess_env(device_count=device_count),
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT_S,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.mark.parametrize("device_count", [8, 32])
def test_t5_base_shardings_equal_the_golden_file(device_count):
  path = os.path.join(GOLDEN_DIR, f"sharding_t5_base_{device_count}_devices.json")
  actual = _recorded_text(device_count)
  if REGENERATE:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, "w") as f:
      f.write(actual)
    return
  if not os.path.exists(path):
    pytest.fail(f"{path} is missing; create it with: {REGENERATE_COMMAND}")
  with open(path) as f:
    expected = f.read()
  if actual != expected:
    diff = _layout_diffs(json.loads(expected), json.loads(actual))
    shown = "\n".join(diff[:MAX_DIFF_LINES])
    more = (
      f"\n... {len(diff) - MAX_DIFF_LINES} more diff lines" if len(diff) > MAX_DIFF_LINES else ""
    )
    pytest.fail(
      f"the shardings on {device_count} devices changed ({os.path.relpath(path, REPO)}):\n"
      f"{shown}{more}\nIf the change is intended, regenerate and commit: {REGENERATE_COMMAND}",
      pytrace=False,
    )


def _layout_diffs(expected: dict, actual: dict) -> list[str]:
  """A unified diff per layout whose record changed, headed by the layout's name."""
  lines = []
  for layout in sorted(set(expected) | set(actual)):
    before = to_text(expected.get(layout, {})).splitlines()
    after = to_text(actual.get(layout, {})).splitlines()
    if before != after:
      golden, now = f"golden: {layout}", f"now: {layout}"
      lines += difflib.unified_diff(before, after, golden, now, lineterm="", n=1)
  return lines
