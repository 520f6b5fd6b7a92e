"""A bank on disk: the model's config, the parameters, entry metadata and named plans.

A saved bank is a directory::

    model.json          {"architecture": "t5" | "gpt2", "config": {...}, "method": "mom", ...}
                        (method: the training method that wrote it; its registered
                        bank reader runs the bank, see modjax.core.registry)
    entries.json        entry metadata (see modjax.models.bank), {} when there is none
    plans/<name>.json   named plans (Plan.to_dict); "default" is the plan the bank was made for
    params/             the parameters (an Orbax pytree, via modjax.store.checkpoint)

A training workdir is also a bank: ``modjax.train`` writes ``model.json``, ``entries.json`` and
``plans/`` when it starts, the frozen part of the parameters once to ``frozen/``, and the
trainable part with every checkpoint. :func:`load_bank` reads both forms, so ``evaluate`` and
``assemble`` need nothing but the directory (no training config, no optimizer).
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
from etils import epath

from modjax.core.model_config import GPT2Config, T5Config
from modjax.core.plan import Plan, PlanError
from modjax.models import architecture_for
from modjax.models.bank import merge_params
from modjax.store import checkpoint
from modjax.store.checkpoint import CheckpointError

_ARCHITECTURES = {"t5": T5Config, "gpt2": GPT2Config}
_PLAN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
DEFAULT_PLAN = "default"


@dataclasses.dataclass
class StoredBank:
  """What :func:`load_bank` returns."""

  model: object  # modjax.models.T5 | GPT2
  params: dict
  meta: dict
  plans: dict[str, Plan]
  step: int | None = None  # the training step, for a workdir
  method: str | None = None  # the training method that wrote it (model.json; modjax.core.registry)

  def plan(self, name: str | None = None) -> Plan:
    """A named plan (``None``: the default plan, else the model's identity plan)."""
    if name is None:
      return self.plans.get(DEFAULT_PLAN, self.model.identity_plan())
    if name not in self.plans:
      raise PlanError(f"no plan named {name!r} in this bank; it has {sorted(self.plans)}")
    return self.plans[name].validate(self.params, self.model.stacks)


# ---- model config ---------------------------------------------------------------------------


def config_to_dict(config) -> dict:
  for name, cls in _ARCHITECTURES.items():
    if isinstance(config, cls):
      return {"architecture": name, "config": dataclasses.asdict(config)}
  raise TypeError(f"no architecture for config type {type(config).__name__}")


def config_from_dict(data: dict):
  arch = data.get("architecture") if isinstance(data, dict) else None
  if arch not in _ARCHITECTURES:
    raise CheckpointError(
      f"model.json names architecture {arch!r}; expected one of {sorted(_ARCHITECTURES)}"
    )
  cls = _ARCHITECTURES[arch]
  known = {f.name for f in dataclasses.fields(cls)}
  raw = data.get("config", {})
  unknown = sorted(set(raw) - known)
  if unknown:
    raise CheckpointError(f"model.json has unknown {arch} config fields {unknown}")
  return cls(**raw)


# ---- writing --------------------------------------------------------------------------------


def write_description(directory, model, *, meta=None, plans=None, method=None) -> None:
  """``model.json`` (the architecture and, given, the training method that wrote the bank),
  ``entries.json`` and ``plans/*.json`` (process 0 writes; all may call)."""
  root = epath.Path(directory)
  if jax.process_index() != 0:
    return
  root.mkdir(parents=True, exist_ok=True)
  description = config_to_dict(model.config)
  if method is not None:
    description["method"] = method
  (root / "model.json").write_text(json.dumps(description, indent=1))
  (root / "entries.json").write_text(json.dumps(meta or {}, indent=1, sort_keys=True))
  for name, plan in (plans or {}).items():
    save_plan(root, name, plan, overwrite=True)


def save_plan(directory, name: str, plan: Plan, *, overwrite: bool = False) -> epath.Path:
  """Writes ``plans/<name>.json``; refuses to replace an existing plan unless ``overwrite``."""
  if not isinstance(name, str) or not _PLAN_NAME.fullmatch(name):
    raise PlanError(f"plan name {name!r} is invalid; use letters, digits, '_', '.', '-'")
  path = epath.Path(directory) / "plans" / f"{name}.json"
  if path.exists() and not overwrite:
    raise PlanError(f"a plan named {name!r} exists at {path}; choose another name or overwrite")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(plan.to_json())
  return path


def save_bank(
  directory, model, params, *, meta=None, plans=None, overwrite=False, method=None
) -> None:
  """A standalone bank directory (see the module docstring)."""
  root = epath.Path(directory)
  if root.exists() and any(root.iterdir()) and not overwrite:
    raise CheckpointError(f"{root} exists and is not empty; choose a new directory")
  for plan in (plans or {}).values():
    plan.validate(params, model.stacks)
  checkpoint.save_pytree(root / "params", params, overwrite=overwrite)
  write_description(root, model, meta=meta, plans=plans, method=method)


# ---- reading --------------------------------------------------------------------------------


def read_plan_file(path) -> Plan:
  path = epath.Path(path)
  if not path.exists():
    raise PlanError(f"no plan file at {path}; give a JSON plan or a saved plan's name")
  return Plan.from_json(path.read_text())


def is_bank(directory) -> bool:
  return (epath.Path(directory) / "model.json").exists()


def load_bank(directory) -> StoredBank:
  """A saved bank or a training workdir (its latest good checkpoint merged with ``frozen/``)."""
  root = epath.Path(directory)
  if not is_bank(root):
    raise CheckpointError(
      f"{root} holds no model.json: not a modjax bank or training workdir (train or export first)"
    )
  description = json.loads((root / "model.json").read_text())
  model = architecture_for(config_from_dict(description))
  meta = _read_json(root / "entries.json", {})
  plans = {p.stem: read_plan_file(p) for p in sorted((root / "plans").glob("*.json"))}
  step = None
  if (root / "params").exists():
    params = checkpoint.restore_pytree(root / "params")
  else:
    step, params = _restore_workdir(root)
  for name, plan in plans.items():
    try:
      plan.validate(params, model.stacks)
    except PlanError as e:
      raise PlanError(f"saved plan {name!r} in {root} does not fit the bank: {e}") from e
  return StoredBank(model, params, meta, plans, step, description.get("method"))


def _restore_workdir(root: epath.Path):
  ckpt = checkpoint.Checkpointer(
    str(root / "checkpoints"), max_to_keep=None, save_interval_steps=1, async_save=False
  )
  try:
    restored = ckpt.restore_latest(None)
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"no readable checkpoint in {root / 'checkpoints'}; train first")
  step, state, _ = restored
  params = state["params"]
  if (root / "frozen").exists():
    params = merge_params(params, checkpoint.restore_pytree(root / "frozen"))
  return step, params


def _read_json(path: epath.Path, default):
  if not path.exists():
    return default
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); restore it or write it again") from e
