"""Pre-activation features of a plan's FFNs and the Pearson correlations between positions.

The feature of a position is its FFN's input projection before the nonlinearity (``branch="gate"``,
the paper's: ``wi``, or the gate branch ``wi_0`` of a gated FFN), or, for a gated FFN, its linear
up branch ``wi_1`` (``branch="up"``): what the permutation must line up (both branches share the
hidden axis, so either one aligns the whole FFN). The statistics are streamed: one jitted call per
batch runs the model under the plan (collecting that branch only), drops padding,
and folds the batch into running per-position moments (token count, mean, centred second moments)
and centred cross sums ``sum (x_i - mean_i)(x_j - mean_j)^T`` [d_ff x d_ff] for the position pairs
asked for only (all pairs of a deep stack would not fit). Batches are combined with the pairwise
update of Chan, Golub and LeVeque, so float32 stays accurate when a unit's mean is large against
its spread, where raw sums of x and x^2 would cancel.

Positions are indices into a plan's stack (slot 0, 1, ...), so features can be taken under any
plan: an assembled one, or one that already shares FFNs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from modjax.core.plan import Plan, PlanError
from modjax.core.progress import Progress

log = logging.getLogger(__name__)

MIN_STD = 1e-7  # a unit with a smaller standard deviation is treated as having this one
# the FFN branch a feature is read from, and the intermediate the model collects for it
BRANCHES = {"gate": "ffn_pre", "up": "ffn_linear"}


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Streamed moments of every position's FFN pre-activations, per stack.

  ``count[stack]``: tokens seen; ``mean[stack]`` and ``m2[stack]``: [P, F] per-position means and
  sums of squared deviations; ``cross[stack][(i, j)]``: [F, F] sum of centred products between
  position i's units (rows) and position j's (columns); ``branch``: the FFN branch the features
  were read from (``"gate"`` or ``"up"``, see :data:`BRANCHES`)."""

  count: dict[str, float]
  mean: dict[str, np.ndarray]
  m2: dict[str, np.ndarray]
  cross: dict[str, dict[tuple[int, int], np.ndarray]]
  branch: str = "gate"

  def std(self, stack: str, min_std: float = MIN_STD) -> np.ndarray:
    """[P, F] population standard deviations, clipped below at ``min_std``."""
    return np.maximum(np.sqrt(self.m2[stack] / max(self.count[stack], 1.0)), min_std)

  def correlation(self, stack: str, i: int, j: int, min_std: float = MIN_STD) -> np.ndarray:
    """[F, F] Pearson correlation between the units of positions i (rows) and j (columns).

    A dead unit (zero spread) gets a clipped std, so its correlations are ~0 instead of NaN."""
    cross = self.cross.get(stack, {})
    if (i, j) in cross:
      c_FF = cross[(i, j)]
    elif (j, i) in cross:
      c_FF = cross[(j, i)].T
    else:
      raise PlanError(
        f"no cross statistics between {stack} positions {i} and {j}; collect them with "
        f"pairs={{'{stack}': [({i}, {j})]}} (collected: {sorted(cross)})"
      )
    std_PF = self.std(stack, min_std)
    cov_FF = c_FF / max(self.count[stack], 1.0)
    return cov_FF / (std_PF[i][:, None] * std_PF[j][None, :])


def token_mask(model, batch: Mapping, stack: str):
  """[B, L] True on real tokens of ``stack``'s input, as the attention masks see them: segment ids
  when the batch is packed, else non-padding ids (encoder inputs, decoder targets; seqio pads
  with 0, and the all-zero rows that fill a last eval batch drop out)."""
  prefix = "encoder" if stack == "encoder" else "decoder"
  segments = batch.get(f"{prefix}_segment_ids")
  if segments is not None:
    return segments > 0
  if stack == "encoder":
    return batch["encoder_input_tokens"] != model.config.pad_token_id
  return batch["decoder_target_tokens"] != 0


def check_branch(model, branch: str) -> None:
  """One-line PlanError unless ``branch`` is known and the model's FFNs have it."""
  if branch not in BRANCHES:
    raise PlanError(f"feature branch {branch!r} is unknown; use one of {tuple(BRANCHES)}")
  ungated = [s for s in model.stacks if not model.stack_block_spec(s).gated_ffn]
  if branch == "up" and ungated:
    raise PlanError(
      f"feature branch 'up' reads a gated FFN's wi_1, but the {ungated[0]}'s FFNs are not gated; "
      "use branch 'gate'"
    )


def _ffn_features(model, plan: Plan, params, batch, branch: str = "gate"):
  """``{stack: (features_BLF per position)}`` of ``branch`` from one forward pass collecting
  nothing else."""
  name = BRANCHES[branch]
  _, inter = model.apply_batch(params, plan, batch, collect=(name,))
  return {stack: inter[stack][name] for stack in model.stacks}


def _batch_moments(pre_PNF, w_N, pairs):
  """Moments of one batch's masked features (same layout as the running state)."""
  n = jnp.sum(w_N)
  mean_PF = jnp.einsum("pnf,n->pf", pre_PNF, w_N) / jnp.maximum(n, 1.0)
  xc_PNF = (pre_PNF - mean_PF[:, None, :]) * w_N[None, :, None]
  cross = [xc_PNF[i].T @ xc_PNF[j] for i, j in pairs]
  return {
    "count": n,
    "mean": mean_PF,
    "m2": jnp.sum(xc_PNF * xc_PNF, axis=1),
    "cross": jnp.stack(cross) if cross else jnp.zeros((0,) + pre_PNF.shape[-1:] * 2),
  }


def _combine(a, b, pairs):
  """Chan et al.'s pairwise update: the moments of the union of two disjoint token sets."""
  n = a["count"] + b["count"]
  weight = b["count"] / jnp.maximum(n, 1.0)
  scale = a["count"] * weight  # n_a n_b / n
  delta_PF = b["mean"] - a["mean"]
  out = {
    "count": n,
    "mean": a["mean"] + delta_PF * weight,
    "m2": a["m2"] + b["m2"] + scale * delta_PF * delta_PF,
    "cross": a["cross"] + b["cross"],
  }
  if pairs:
    rows, cols = (jnp.asarray(x) for x in zip(*pairs, strict=True))
    out["cross"] += scale * delta_PF[rows][:, :, None] * delta_PF[cols][:, None, :]
  return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("branch",))
def _accumulate(model, plan: Plan, pairs: tuple, state, params, batch, branch: str = "gate"):
  """The running state with one batch folded in; compiled once per (model, plan, pairs, branch,
  shape)."""
  pre = _ffn_features(model, plan, params, batch, branch)
  pairs = dict(pairs)
  out = {}
  for stack, running in state.items():
    pre_PNF = jnp.stack(pre[stack]).astype(jnp.float32)
    pre_PNF = pre_PNF.reshape(pre_PNF.shape[0], -1, pre_PNF.shape[-1])
    w_N = token_mask(model, batch, stack).reshape(-1).astype(jnp.float32)
    out[stack] = _combine(running, _batch_moments(pre_PNF, w_N, pairs[stack]), pairs[stack])
  return out


def _initial_state(positions: int, d_ff: int, num_pairs: int) -> dict:
  return {
    "count": jnp.zeros((), jnp.float32),
    "mean": jnp.zeros((positions, d_ff), jnp.float32),
    "m2": jnp.zeros((positions, d_ff), jnp.float32),
    "cross": jnp.zeros((num_pairs, d_ff, d_ff), jnp.float32),
  }


def _check_pairs(stack: str, pairs: Iterable, positions: int) -> tuple[tuple[int, int], ...]:
  out = tuple(dict.fromkeys((int(i), int(j)) for i, j in pairs))
  bad = [p for p in out if not (0 <= p[0] < positions and 0 <= p[1] < positions)]
  if bad:
    raise PlanError(f"{stack} position pair {bad[0]} is outside the plan's 0..{positions - 1}")
  return out


def collect_stats(
  model,
  params,
  plan: Plan,
  batches: Iterable[Mapping],
  *,
  pairs: Mapping[str, Iterable[tuple[int, int]]] | None = None,
  max_tokens: int | None = None,
  branch: str = "gate",
) -> FeatureStats:
  """Feature statistics of every FFN position of ``plan`` over ``batches`` (seqio-style dicts,
  e.g. from ``modjax.train.scoring.make_eval_batches``), with cross sums for ``pairs`` (per stack;
  stacks left out get none), read from ``branch`` (module docstring). Stops after the batch that
  brings a stack's count to ``max_tokens``."""
  plan.validate(params, model.stacks)
  check_branch(model, branch)
  pairs = dict(pairs or {})
  unknown = sorted(set(pairs) - set(model.stacks))
  if unknown:
    raise PlanError(f"pairs for unknown stacks {unknown}; the model has {model.stacks}")
  static_pairs = tuple(
    (s, _check_pairs(s, pairs.get(s, ()), len(plan.stack(s)))) for s in model.stacks
  )
  d_ff = model.stack_block_spec(model.stacks[0]).d_ff
  state = {s: _initial_state(len(plan.stack(s)), d_ff, len(p)) for s, p in static_pairs}
  seen, progress = 0, Progress("ffn features", max_tokens, "tokens", logger=log)
  for index, batch in enumerate(batches):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    state = _accumulate(model, plan, static_pairs, state, params, batch, branch=branch)
    seen = min(float(state[s]["count"]) for s in model.stacks)
    progress.update(done=seen, note=f"batch {index + 1}")  # the first batch compiles
    if max_tokens is not None and seen >= max_tokens:
      break
  if seen <= 0:
    raise PlanError("the calibration batches hold no real tokens; check the split and lengths")
  host = jax.device_get(state)
  return FeatureStats(
    count={s: float(host[s]["count"]) for s in host},
    mean={s: np.asarray(host[s]["mean"]) for s in host},
    m2={s: np.asarray(host[s]["m2"]) for s in host},
    cross={s: dict(zip(p, np.asarray(host[s]["cross"]), strict=True)) for s, p in static_pairs},
    branch=branch,
  )
