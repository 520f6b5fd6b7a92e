"""Aligning the hidden units of FFNs before averaging them.

An FFN's hidden units can be reordered without changing what it computes, as long as the input
projection's output units (``wi``, or both ``wi_0`` and ``wi_1`` of a gated FFN, with their
biases) and the output projection's input units (``wo``'s rows) move together; ``wo``'s bias is
not on the hidden axis and stays. Kernels are stored ``[d_model, d_ff]`` (``wi*``) and
``[d_ff, d_model]`` (``wo``), see ``modjax.nn.layers.FeedForward``.

Alignment picks, for every other layer of a window, the permutation that maximises the total
correlation of its units with the reference layer's (``scipy.optimize.linear_sum_assignment``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from modjax.core.plan import PlanError

REFERENCES = ("first", "last", "middle")
INPUT_PROJECTIONS = ("wi", "wi_0", "wi_1")


def reference_offset(k: int, reference: str = "first") -> int:
  """Offset of the reference layer inside a window of ``k``: 0, k - 1 or k // 2 (the later of
  the two middle layers when k is even)."""
  if reference not in REFERENCES:
    raise PlanError(f"reference {reference!r} is unknown; use one of {REFERENCES}")
  return {"first": 0, "last": k - 1, "middle": k // 2}[reference]


def assignment(corr_FF) -> np.ndarray:
  """``perm`` with ``perm[r]`` = the unit of the other layer matched to reference unit ``r``
  (rows of ``corr_FF`` are the reference's units), maximising the summed correlation."""
  corr_FF = np.asarray(corr_FF, np.float64)
  if corr_FF.ndim != 2 or corr_FF.shape[0] != corr_FF.shape[1]:
    raise ValueError(f"a correlation between two FFNs is square [F, F], got {corr_FF.shape}")
  if not np.all(np.isfinite(corr_FF)):
    raise ValueError("the correlation has NaN or infinite entries; check the calibration features")
  rows, cols = linear_sum_assignment(corr_FF, maximize=True)
  perm = np.empty_like(cols)
  perm[rows] = cols
  return perm


def permute_ffn(ffn: Mapping, perm) -> dict:
  """The same FFN with hidden unit ``r`` taken from unit ``perm[r]`` (its output is unchanged)."""
  perm = jnp.asarray(perm)
  unknown = sorted(set(ffn) - set(INPUT_PROJECTIONS) - {"wo"})
  if unknown or "wo" not in ffn:
    raise PlanError(f"an FFN entry holds {sorted(ffn)}; expected wi (or wi_0, wi_1) and wo")
  out = {}
  for name, proj in ffn.items():
    if name == "wo":
      out[name] = {**proj, "kernel": jnp.take(proj["kernel"], perm, axis=0)}
    else:
      out[name] = {k: jnp.take(v, perm, axis=-1) for k, v in proj.items()}
  return out


def align_window(ffns, reference: int, correlations) -> list:
  """``ffns`` (a window's FFN parameters, in order) with every layer but ``reference`` permuted
  by the assignment of ``correlations[i]`` ([F, F], reference units x layer i's units)."""
  out = []
  for i, ffn in enumerate(ffns):
    out.append(ffn if i == reference else permute_ffn(ffn, assignment(correlations[i])))
  return out
