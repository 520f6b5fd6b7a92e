"""Merging feed-forward sublayers (Verma, Murray, Duh, 2025): k consecutive layers share ONE FFN.

Pure functions over (bank, plan), so they apply to any plan (the identity, an assembled Modular
Transformers plan, a plan that already shares FFNs):

* :mod:`.features`: streamed pre-activation statistics (the gate branch, or a gated FFN's up
  branch) of every FFN position over calibration batches, padding excluded; Pearson
  cross-correlation with tiny standard deviations clipped;
* :mod:`.align`: the reference layer of a window (first, last or middle), the linear assignment
  maximising correlation, and permuting an FFN's hidden units (output unchanged);
* :mod:`.merge`: the aligned (or vanilla) average as one new ``<stack>/ffns/<name>`` entry that
  the window's slots point at, for one window or several (:mod:`.ranges`: disjoint ranges per
  stack, each stack its own); the layer-drop baseline (explicit layers, nothing rounded);
* :mod:`.window`: sliding the window and keeping the candidate with the best validation score;
* :mod:`.recovery`: trainable/frozen split and loss for fine-tuning through the step contract;
* :mod:`.source`, :mod:`.commands`: ``python -m modjax.merge`` over a bank or a Hugging Face
  directory.
"""

from modjax.methods.ffn_merge.align import (
  REFERENCES,
  align_window,
  assignment,
  permute_ffn,
  reference_offset,
)
from modjax.methods.ffn_merge.features import (
  BRANCHES,
  MIN_STD,
  FeatureStats,
  collect_stats,
  token_mask,
)
from modjax.methods.ffn_merge.merge import (
  METHODS,
  check_window,
  drop_layers,
  drop_window,
  dropped_layers,
  entry_name,
  merge_ranges,
  merge_window,
  merge_windows,
  merged_ffn,
  position_ffn,
)
from modjax.methods.ffn_merge.ranges import Windows, check_windows, windows_at
from modjax.methods.ffn_merge.recovery import recovery_loss, split_trainable
from modjax.methods.ffn_merge.window import (
  WindowChoice,
  calibration_stats,
  candidate_starts,
  choose_window,
  range_pairs,
  window_pairs,
)

__all__ = [
  "BRANCHES",
  "METHODS",
  "MIN_STD",
  "REFERENCES",
  "FeatureStats",
  "WindowChoice",
  "Windows",
  "align_window",
  "assignment",
  "calibration_stats",
  "candidate_starts",
  "check_window",
  "check_windows",
  "choose_window",
  "collect_stats",
  "drop_layers",
  "drop_window",
  "dropped_layers",
  "entry_name",
  "merge_ranges",
  "merge_window",
  "merge_windows",
  "merged_ffn",
  "permute_ffn",
  "position_ffn",
  "range_pairs",
  "recovery_loss",
  "reference_offset",
  "split_trainable",
  "token_mask",
  "window_pairs",
  "windows_at",
]
