"""Merging feed-forward sublayers (Verma, Murray, Duh, 2025): k consecutive layers share ONE FFN.

Pure functions over (bank, plan), so they apply to any plan (the identity, an assembled Modular
Transformers plan, a plan that already shares FFNs):

* :mod:`.features`: streamed pre-activation statistics of every FFN position over calibration
  batches, padding excluded; Pearson cross-correlation with tiny standard deviations clipped;
* :mod:`.align`: the reference layer of a window (first, last or middle), the linear assignment
  maximising correlation, and permuting an FFN's hidden units (output unchanged);
* :mod:`.merge`: the aligned (or vanilla) average as one new ``<stack>/ffns/<name>`` entry that
  the window's slots point at; the layer-drop baseline;
* :mod:`.window`: sliding the window and keeping the candidate with the best validation score;
* :mod:`.recovery`: trainable/frozen split and loss for fine-tuning through the step contract.
"""

from modjax.methods.ffn_merge.align import (
  REFERENCES,
  align_window,
  assignment,
  permute_ffn,
  reference_offset,
)
from modjax.methods.ffn_merge.features import MIN_STD, FeatureStats, collect_stats, token_mask
from modjax.methods.ffn_merge.merge import (
  METHODS,
  check_window,
  drop_window,
  entry_name,
  layers_to_drop,
  merge_window,
  merge_windows,
  merged_ffn,
  position_ffn,
)
from modjax.methods.ffn_merge.recovery import recovery_loss, split_trainable
from modjax.methods.ffn_merge.window import (
  WindowChoice,
  calibration_stats,
  candidate_starts,
  choose_window,
  window_pairs,
)

__all__ = [
  "METHODS",
  "MIN_STD",
  "REFERENCES",
  "FeatureStats",
  "WindowChoice",
  "align_window",
  "assignment",
  "calibration_stats",
  "candidate_starts",
  "check_window",
  "choose_window",
  "collect_stats",
  "drop_window",
  "entry_name",
  "layers_to_drop",
  "merge_window",
  "merge_windows",
  "merged_ffn",
  "permute_ffn",
  "position_ffn",
  "recovery_loss",
  "reference_offset",
  "split_trainable",
  "token_mask",
  "window_pairs",
]
