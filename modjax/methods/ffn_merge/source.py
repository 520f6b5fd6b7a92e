"""What ``python -m modjax.merge`` reads and copies: the model to merge (a bank, a training workdir
or a Hugging Face ``save_pretrained`` directory) and the vocabulary that goes beside the merged
bank, so evaluation and recovery need no other directory."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
from etils import epath

from modjax.core.plan import Plan, PlanError
from modjax.data import vocab
from modjax.models import architecture_for
from modjax.store import bank_io, hf
from modjax.train import experiment

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class Source:
  """The model to merge, under the plan it is merged in."""

  model: object
  params: dict
  plan: Plan
  meta: dict
  kind: str  # "bank" (a saved bank or a training workdir) or "hf"


def is_hf_directory(directory) -> bool:
  root = epath.Path(directory)
  return not bank_io.is_bank(root) and (root / "config.json").exists()


def load_source(directory, cfg, plan: str | None = None, *, hf_only: bool = False) -> Source:
  """A bank or workdir (under ``plan``: a saved name, default its default plan), or a Hugging
  Face directory (its identity plan; ``hf_only``: nothing else is accepted)."""
  if hf_only and not is_hf_directory(directory):
    raise experiment.ConfigError(
      f"--hf {directory} is not a save_pretrained directory (no config.json, or it is a modjax "
      "bank); give a bank with --bank"
    )
  if not is_hf_directory(directory):
    stored = bank_io.load_bank(directory)
    return Source(stored.model, stored.params, stored.plan(plan), stored.meta, "bank")
  if plan is not None:
    raise PlanError(
      f"--plan {plan}: a Hugging Face directory runs its own layers (the identity plan); drop --plan"
    )
  config, params = hf.import_checkpoint(
    os.fspath(directory), cfg.model.param_dtype, cfg.model.dtype
  )
  model = architecture_for(config)
  return Source(model, jax.tree.map(jnp.asarray, params), model.identity_plan(), {}, "hf")


def copy_vocabulary(sources, out) -> str | None:
  """Copies the vocabulary of the first of ``sources`` that has one (``vocab.find_vocabulary``)
  into ``out/vocab/``: a bank's ``vocab/`` folder, or a Hugging Face directory's tokenizer files.
  Returns what was copied from, or None."""
  out = epath.Path(out)
  for source in sources:
    found = vocab.find_vocabulary(source) if source else None
    if not found:
      continue
    folder = epath.Path(found).parent
    if folder.name == "vocab":
      shutil.copytree(folder, out / "vocab")
    else:
      (out / "vocab").mkdir(parents=True, exist_ok=True)
      for name in TOKENIZER_FILES:
        if (folder / name).exists():
          shutil.copy(folder / name, out / "vocab" / name)
    return found
  return None
