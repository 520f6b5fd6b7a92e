"""What a MoM run (or a vanilla baseline run of ``configs/mom_gpt2.py``) writes beside its
checkpoints: ``compute.json``, its budget and what it dropped.

``compute.json``::

    {"kind": "mom" | "vanilla" | "wider_ffn" | "extra_layer",
     "steps": last step trained, "batch": ..., "length": ...,
     "params": the trained model's parameters (routers included),
     "router_params": the routers' (0 for a baseline), "n_layer": ..., "d_ff": ...,
     "mom_params": the parameters of the MoM the run is compared with,
     "training_flops_per_step": 3 x forward (modjax.methods.mom.cost), "training_flops": x steps,
     "capacity_dropped": {"mean": ..., "max": ..., "last": ..., "steps": n} or null}

``capacity_dropped`` summarises the per-step metric ``router/dropped`` (in
``metrics/train.jsonl`` and the progress line: the share of routed, non-SKIP (token, slot)
pairs the capacity buffers dropped, averaged over a step's routed sublayers) over every step of
the run, resumed segments included; null when the dispatch drops nothing (``dense``, ``gather``,
``exact``, or a vanilla baseline). ``mom.capacity_factor=0`` trains without drops.
"""

from __future__ import annotations

import json
import logging

import jax
from etils import epath

from modjax.methods.mom import cost

log = logging.getLogger(__name__)
DROPPED = "router/dropped"


def capacity_dropped(root: epath.Path) -> dict | None:
  """Mean, max and last of ``router/dropped`` over the run's steps (the last record of each
  step, so a step repeated after a resume counts once); None when no step logged it."""
  path = root / "metrics" / "train.jsonl"
  if not path.exists():
    return None
  by_step = {}
  for line in path.read_text().splitlines():
    record = json.loads(line) if line.strip() else {}
    if DROPPED in record:
      by_step[record["step"]] = record[DROPPED]
  if not by_step:
    return None
  values = [by_step[s] for s in sorted(by_step)]
  return {
    "mean": sum(values) / len(values),
    "max": max(values),
    "last": values[-1],
    "steps": len(values),
  }


def write_compute(cfg, root: epath.Path, model, *, kind: str, steps: int, params: dict) -> dict:
  """Writes ``root/compute.json`` (module docstring); ``params``: the counts to record
  (``params``, ``router_params``, ``mom_params``)."""
  batch, length = cfg.train.batch_size, cfg.data.targets_length
  per_step = cost.training_flops_per_step(model, batch, length)
  record = {"kind": kind, "steps": steps, "batch": batch, "length": length, **params}
  record.update(n_layer=model.config.n_layer, d_ff=model.config.d_ff)
  record.update(training_flops_per_step=per_step, training_flops=per_step * steps)
  record["capacity_dropped"] = capacity_dropped(root)
  if jax.process_index() == 0:
    (root / "compute.json").write_text(json.dumps(record, indent=1) + "\n")
  dropped = record["capacity_dropped"]
  log.info(
    "%s: %d parameters, %.3g training FLOPs over %d steps%s",
    kind,
    record["params"],
    record["training_flops"],
    steps,
    f"; capacity dropped {dropped['mean']:.2%} of routed slots on average" if dropped else "",
  )
  return record
