"""FFN merging over several windows and the layer-drop baseline: windows per stack (disjoint,
each stack its own), each window its own shared FFN, drops that remove exactly the layers asked
for (so drops of 1, 2 and 3 layers are three different models), and the command-line spelling of
windows and starts."""

import dataclasses

import jax
import numpy as np
import pytest
from test_ffn_merge import T5_MODEL, _batches, _ffn_size, _random_bank

from modjax.core.plan import PlanError
from modjax.methods import ffn_merge as fm
from modjax.methods.ffn_merge import ranges
from modjax.models import T5, bank, cost


def test_drops_of_one_two_and_three_layers_are_three_different_plans():
  model, params, plan = T5_MODEL, _random_bank(T5_MODEL), T5_MODEL.identity_plan()
  layer = bank.count_params(params["decoder"]["blocks"]["0"])
  total = sum(cost.count_params(model, plan, params).values())
  plans = {}
  for n in (1, 2, 3):
    _, plans[n] = fm.merge_windows(model, params, plan, {"decoder": 1}, n, method="drop")
    assert [s.block for s in plans[n].decoder] == ["0", *[str(p) for p in range(1 + n, 4)]]
    assert plans[n].encoder == plan.encoder
    assert total - sum(cost.count_params(model, plans[n], params).values()) == n * layer
  assert len(set(plans.values())) == 3
  explicit = fm.drop_layers(model, params, plan, {"decoder": [3, 0], "encoder": [2]})
  assert [s.block for s in explicit.decoder] == ["1", "2"]
  assert [s.block for s in explicit.encoder] == ["0", "1", "3"]
  cases = [
    ({"decoder": [4]}, "distinct positions in 0..3"),
    ({"decoder": [1, 1]}, "distinct positions"),
    ({"decoder": [0, 1, 2, 3]}, "without a layer"),
    ({"middle": [0]}, "unknown stack"),
  ]
  for layers, message in cases:
    with pytest.raises(PlanError, match=message):
      fm.drop_layers(model, params, plan, layers)


def test_several_windows_in_one_plan_each_share_their_own_ffn_with_a_start_per_stack():
  model = T5(dataclasses.replace(T5_MODEL.config, num_layers=6, num_decoder_layers=5))
  params, plan = _random_bank(model, 0.3), model.identity_plan()
  windows = {"encoder": ((3, 5), (0, 2)), "decoder": ((2, 4),)}
  stats = fm.calibration_stats(model, params, plan, [b for b, _ in _batches(model, 2)],
                               windows=windows)  # fmt: skip
  assert sorted(stats.cross["encoder"]) == [(0, 1), (3, 4)] and list(stats.cross["decoder"]) == [
    (2, 3)
  ]
  merged, merged_plan = fm.merge_ranges(model, params, plan, windows, stats=stats)
  assert [s.ffn for s in merged_plan.encoder] == [
    "merged.0-2", "merged.0-2", None, "merged.3-5", "merged.3-5", None
  ]  # fmt: skip
  assert [s.ffn for s in merged_plan.decoder] == [None, None, "merged.2-4", "merged.2-4", None]
  # each window is what merging it alone gives
  for stack, (start, stop) in [("encoder", (0, 2)), ("encoder", (3, 5)), ("decoder", (2, 4))]:
    alone, _ = fm.merge_window(model, params, plan, stack, start, stop - start, stats=stats)
    name = fm.entry_name(start, stop - start)
    jax.tree.map(np.testing.assert_array_equal, merged[stack]["ffns"][name],
                 alone[stack]["ffns"][name])  # fmt: skip
  before = cost.count_params(model, plan, params)
  after = cost.count_params(model, merged_plan, merged)
  assert before["encoder"] - after["encoder"] == 2 * _ffn_size(params, "encoder")
  assert before["decoder"] - after["decoder"] == _ffn_size(params, "decoder")
  _, dropped = fm.merge_ranges(model, params, plan, windows, method="drop")
  assert [s.block for s in dropped.encoder] == ["2", "5"]
  assert [s.block for s in dropped.decoder] == ["0", "1", "4"]
  bad = [
    ({"encoder": ((0, 3), (2, 4))}, "overlap"),
    ({"encoder": ((4, 7),)}, "does not fit"),
    ({"encoder": ((2, 2),)}, "does not fit"),
    ({"middle": ((0, 2),)}, "unknown stack"),
    ({}, "no window"),
  ]
  for spec, message in bad:
    with pytest.raises(PlanError, match=message):
      fm.merge_ranges(model, params, plan, spec, method="vanilla")


def test_window_flags_parse_into_ranges_per_stack():
  stacks = ("encoder", "decoder")
  assert ranges.parse_windows(["0-2,3-5"], stacks) == {s: ((0, 2), (3, 5)) for s in stacks}
  assert ranges.parse_windows(["encoder:0-2", "decoder:4,1-3"], stacks) == {
    "encoder": ((0, 2),),
    "decoder": ((4, 5), (1, 3)),
  }
  assert ranges.parse_start("auto", stacks, 2) == "auto"
  assert ranges.parse_start("1", stacks, 3) == {s: ((1, 4),) for s in stacks}
  assert ranges.parse_start("encoder=0,decoder=2", stacks, 2) == {
    "encoder": ((0, 2),),
    "decoder": ((2, 4),),
  }
  for call, message in [
    (lambda: ranges.parse_windows(["middle:0-2"], stacks), "not one of the merged stacks"),
    (lambda: ranges.parse_windows(["0-x"], stacks), "not a layer index"),
    (lambda: ranges.parse_windows(["decoder:"], stacks), "names no range"),
    (lambda: ranges.parse_start("encoder=0,encoder=1", stacks, 2), "given twice"),
    (lambda: ranges.parse_start("-1", stacks, 2), "negative"),
  ]:
    with pytest.raises(PlanError, match=message) as info:
      call()
    assert "\n" not in str(info.value)
