"""Recovery fine-tuning of a merged bank: ``python -m modjax.train --config configs/ffn_merge.py``.

Loads the bank ``python -m modjax.merge`` wrote (``config.ffn_merge.bank``), takes its default
plan (the merged one), and fine-tunes through the generic loop: the trainable part is what the
plan reads (``scope="plan"``) or only the shared FFN entries (``"merged"``), the rest frozen.
Checkpoints, resume, sharding and the workdir's bank are the loop's, so the recovered model
evaluates, merges again and exports like any run.
"""

from __future__ import annotations

import logging
import os

import ml_collections
from etils import epath

from modjax.core.registry import Method
from modjax.core.run_config import with_values
from modjax.methods.ffn_merge.recovery import SCOPES, recovery_loss, split_trainable
from modjax.store import bank_io
from modjax.train import experiment
from modjax.train.loop import TrainResult, train

log = logging.getLogger(__name__)


def add_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``ffn_merge`` section of a recovery config."""
  c.method = "ffn_merge"
  c.ffn_merge = ml_collections.ConfigDict()
  c.ffn_merge.bank = ""  # the merged bank (python -m modjax.merge --out)
  c.ffn_merge.scope = "plan"  # "plan": every parameter the plan reads; "merged": shared FFNs only
  return c


def load_merged(cfg) -> bank_io.StoredBank:
  """The merged bank (one-line errors when missing); the run reads its vocabulary
  (:func:`with_merged_vocabulary`)."""
  path = cfg.ffn_merge.bank
  if not path:
    raise experiment.ConfigError(
      "config.ffn_merge.bank is empty; give the directory python -m modjax.merge wrote"
    )
  if not bank_io.is_bank(path):
    raise experiment.ConfigError(
      f"config.ffn_merge.bank={path!r} holds no bank (no model.json); run python -m modjax.merge"
    )
  if cfg.ffn_merge.scope not in SCOPES:
    raise experiment.ConfigError(
      f"config.ffn_merge.scope={cfg.ffn_merge.scope!r} is invalid: use one of {SCOPES}"
    )
  return bank_io.load_bank(path)


def with_merged_vocabulary(cfg):
  """``cfg``, or a copy that reads the merged bank's vocabulary (a trained ``vocab/spm.model`` or
  a copied ``vocab/tokenizer.json``) unless ``data.vocab_path`` names one."""
  path = epath.Path(cfg.ffn_merge.bank)
  cfg = experiment.with_bank_vocabulary(cfg, path)
  tokenizer = path / "vocab" / "tokenizer.json"
  if cfg.data.vocab_path or not tokenizer.exists():
    return cfg
  return with_values(cfg, {"data.vocab_path": os.fspath(tokenizer), "data.extra_ids": 0})


def recover(cfg) -> TrainResult:
  """Fine-tunes the merged bank's default plan per ``cfg`` (module docstring)."""
  experiment.validate_config(cfg)
  merged = load_merged(cfg)
  cfg = with_merged_vocabulary(cfg)
  model, plan = merged.model, merged.plan()
  trainable, frozen = split_trainable(model, merged.params, plan, cfg.ffn_merge.scope)
  loss_fn = recovery_loss(
    model, plan, label_smoothing=cfg.train.label_smoothing, z_loss=cfg.train.z_loss
  )
  log.info("recovering %s (%s) from %s", plan.describe(), cfg.ffn_merge.scope, cfg.ffn_merge.bank)
  return train(
    cfg,
    loss_fn=loss_fn,
    init_params=trainable,
    frozen=frozen,
    model=model,
    plans={bank_io.DEFAULT_PLAN: plan},
    meta=merged.meta,
    validate=False,
  )


METHOD = Method("ffn_merge", run=recover, add_defaults=add_defaults)
