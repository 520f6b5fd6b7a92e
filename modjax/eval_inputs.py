"""What ``python -m modjax.evaluate`` (and the sweeps that reuse it) scores: the model with its
parameters and plan, read from a bank, a training workdir or a Hugging Face checkpoint (a bank a
method wrote runs through that method's registered reader), and the draft plan of self-speculative
decoding. Reads, never writes. (The vocabulary: ``train.experiment.load_eval_vocabulary``.)
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from etils import epath

from modjax.core import registry
from modjax.core.plan import Plan, PlanError
from modjax.models import architecture_for
from modjax.store import bank_io, hf
from modjax.store.checkpoint import CheckpointError
from modjax.train import experiment


@dataclasses.dataclass
class Scored:
  """A model with its parameters and the plan to run, and where they came from."""

  model: object
  params: dict
  plan: Plan
  plan_name: str  # a saved plan's name, "identity", or the plan file as given
  step: int | None  # training step of a workdir; 0 for an HF checkpoint; None for a saved bank
  origin: str  # the bank or HF directory
  vocab_dir: epath.Path | None  # where the vocabulary may be (``vocab.find_vocabulary``)
  default_plan: bool  # the plan is the bank's default (output names carry no plan suffix)
  kind: str = "bank"  # "bank" (a saved bank or training workdir) or "hf" (a save_pretrained dir)


def load_scored(cfg, *, bank: str | None = None, hf_dir: str | None = None, plan=None) -> Scored:
  """The bank (``bank``, else ``hf_dir``, else the config's workdir, else ``model.init_from``)
  and the plan (a saved name or a JSON file; None: the default). Reads, never writes."""
  if bank and hf_dir:
    raise experiment.ConfigError("give --bank or --hf, not both")
  root = epath.Path(bank) if bank else None if hf_dir else experiment.workdir(cfg)
  if root is not None and not bank_io.is_bank(root) and not bank and cfg.model.init_from:
    root, hf_dir = None, cfg.model.init_from  # a workdir not trained yet: score the HF weights
  stored = bank_io.load_bank(root) if root is not None and bank_io.is_bank(root) else None
  if stored is not None:
    method_model = registry.bank_model(stored.method, stored.model, stored.meta)
    if method_model is not stored.model:
      return _method_scored(stored, method_model, plan, root)
  file_plan = _plan_file(plan, root)
  if root is None:
    return _load_hf(cfg, hf_dir, plan, file_plan)
  if stored is None:
    raise CheckpointError(
      f"no checkpoint in {root}: it holds no model.json (not a modjax bank or training "
      "workdir); train first, or give --bank DIR or --hf DIR"
    )
  if file_plan is not None:
    chosen = _validated(file_plan, stored.params, stored.model, plan)
  else:
    chosen = stored.plan(plan)
  name = plan or (bank_io.DEFAULT_PLAN if bank_io.DEFAULT_PLAN in stored.plans else "identity")
  default = plan in (None, bank_io.DEFAULT_PLAN) or chosen == stored.plan()
  return Scored(stored.model, stored.params, chosen, name, stored.step, str(root), root, default)


def _method_scored(stored: bank_io.StoredBank, model, plan, root) -> Scored:
  """A bank its method runs with its own model (its registered reader: a Mixture-of-Modules bank
  runs its routed structure), not with a plan."""
  if plan is not None:
    raise PlanError(
      f"--plan {plan}: a {stored.method} bank runs its method's own structure, not a plan; "
      "drop --plan"
    )
  return Scored(
    model, stored.params, model.identity_plan(), stored.method, stored.step, str(root), root, True
  )


def _plan_file(value, root, flag: str = "--plan") -> Plan | None:
  """The plan in file ``value``, or None when ``value`` names a plan saved in the bank."""
  if value is None:
    return None
  saved = sorted(p.stem for p in (root / "plans").glob("*.json")) if root is not None else []
  if value in saved:
    return None
  if not os.path.isfile(value):
    raise PlanError(
      f"{flag} {value!r} is neither a plan saved in the bank (it has {saved}) nor a JSON file"
    )
  try:
    return bank_io.read_plan_file(value)
  except PlanError as e:
    raise PlanError(f"{flag} {value}: {e}") from None


def _validated(plan: Plan, params, model, label, flag: str = "--plan") -> Plan:
  try:
    return plan.validate(params, model.stacks)
  except PlanError as e:
    raise PlanError(
      f"{flag} {label} does not fit the bank: {e}{_stack_hint(plan, params)}"
    ) from None


def _stack_hint(plan: Plan, params) -> str:
  """Names a block the plan puts in one stack that only the other stack has."""
  for stack, other in (("encoder", "decoder"), ("decoder", "encoder")):
    mine = params.get(stack, {}).get("blocks", {})
    theirs = params.get(other, {}).get("blocks", {})
    for slot in plan.stack(stack):
      if slot.block not in mine and slot.block in theirs:
        article = "an" if other == "encoder" else "a"
        return (
          f" ({slot.block!r} is {article} {other} block; each stack's slots name its own blocks)"
        )
  return ""


def _load_hf(cfg, hf_dir, plan_label, file_plan) -> Scored:
  config, params = hf.import_checkpoint(hf_dir, cfg.model.param_dtype, cfg.model.dtype)
  model = architecture_for(config)
  params = jax.tree.map(jnp.asarray, params)
  chosen = model.identity_plan() if file_plan is None else file_plan
  chosen = _validated(chosen, params, model, plan_label)
  name = plan_label or "identity"
  default = chosen == model.identity_plan()
  vocab_dir = epath.Path(hf_dir)  # a save_pretrained directory's own tokenizer.json
  return Scored(model, params, chosen, name, 0, hf_dir, vocab_dir, default, kind="hf")


@dataclasses.dataclass(frozen=True)
class Draft:
  """A draft plan for self-speculative greedy decoding, and how many tokens it drafts."""

  plan: Plan
  name: str  # a saved plan's name, or the plan file as given
  tokens: int


def load_draft(scored: Scored, draft: str, draft_tokens: int | None = None) -> Draft:
  """The draft plan ``draft`` (a name saved in the scored bank, or a JSON plan file) checked
  against the bank; ``draft_tokens`` None: what ``assembly/<draft>.json`` recorded, else 4."""
  root = epath.Path(scored.origin) if scored.vocab_dir is not None else None
  plan = _plan_file(draft, root, flag="--draft")
  if plan is None:
    plan = bank_io.read_plan_file(root / "plans" / f"{draft}.json")
  if "encoder" in scored.model.stacks:  # T5 drafts with its decoder over the full encoder
    plan = Plan(encoder=scored.plan.encoder, decoder=plan.decoder)
  plan = _validated(plan, scored.params, scored.model, draft, flag="--draft")
  if draft_tokens is None:
    record = root / "assembly" / f"{draft}.json" if root is not None else None
    recorded = json.loads(record.read_text()) if record and record.exists() else {}
    draft_tokens = recorded.get("draft_tokens", 4)
  if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
    raise experiment.ConfigError(f"--draft-tokens must be an integer >= 1, got {draft_tokens!r}")
  return Draft(plan, draft, draft_tokens)
