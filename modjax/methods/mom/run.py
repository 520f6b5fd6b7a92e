"""Training a MoM decoder: ``python -m modjax.train --config configs/mom_gpt2.py:<size>``.

Phase two of the paper when ``mom.init_from`` names a vanilla GPT-2 run's workdir or a saved
bank (its vocabulary becomes the run's; its layers map into the pools, routers start fresh);
from scratch otherwise (a fresh vanilla GPT-2 of the same parameters, mapped the same way), or
from a Hugging Face GPT-2 checkpoint with ``model.init_from``. Checkpoints, resume, sharding
and metrics are the generic loop's; the workdir is a bank that ``modjax.bank_io.load_bank``
reads (``model.json`` says ``gpt2``: the vanilla config the pools stand for; the MoM structure
is in ``entries.json``; :func:`load_mom_bank` gives the MoM model back).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import ml_collections

from modjax import bank_io
from modjax.methods.mom.loss import mom_loss
from modjax.methods.mom.model import MoMGPT2
from modjax.methods.mom.pools import bank_meta, mom_bank, structure_from_meta
from modjax.methods.mom.structure import MoMConfig, MoMError
from modjax.model_config import GPT2Config
from modjax.train import experiment
from modjax.train.loop import TrainResult, train

log = logging.getLogger(__name__)


def add_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``mom`` section: :class:`MoMConfig`'s fields and defaults, plus ``init_from``."""
  c.method = "mom"
  c.mom = ml_collections.ConfigDict(MoMConfig().to_dict())
  c.mom.init_from = ""  # a vanilla GPT-2 workdir or bank; "" = from scratch
  return c


def structure_from_config(section) -> MoMConfig:
  """The structure a config's ``mom`` section describes (one-line ConfigError when invalid)."""
  values = {k: v for k, v in section.to_dict().items() if k != "init_from"}
  try:
    return MoMConfig.from_dict(values)
  except MoMError as e:
    raise experiment.ConfigError(f"config.{e}") from None


def load_vanilla(cfg) -> bank_io.StoredBank:
  """The vanilla bank ``mom.init_from`` names (the run reads its vocabulary:
  ``experiment.with_bank_vocabulary``)."""
  path = cfg.mom.init_from
  if cfg.model.init_from:
    raise experiment.ConfigError(
      "config.mom.init_from and config.model.init_from are both set; start from one of them"
    )
  if not bank_io.is_bank(path):
    raise experiment.ConfigError(
      f"config.mom.init_from={path!r} holds no bank (no model.json); give a vanilla GPT-2 "
      "run's workdir or a saved bank"
    )
  stored = bank_io.load_bank(path)
  if not isinstance(stored.model.config, GPT2Config):
    raise experiment.ConfigError(
      f"config.mom.init_from={path!r} is a {type(stored.model.config).__name__} bank; "
      "Mixture-of-Modules starts from a GPT-2 one"
    )
  return stored


def _starting_point(cfg, structure: MoMConfig, vocab_size: int, stored):
  """(GPT-2 config of the vanilla model, initial MoM bank or None to initialise in the loop)."""
  rng = jax.random.key(cfg.train.seed)
  if stored is not None:
    config, vanilla = stored.model.config, stored.params
  else:
    gpt2, vanilla = experiment.build_model(cfg, vocab_size)
    config = gpt2.config
    if not isinstance(config, GPT2Config):
      raise experiment.ConfigError(
        f"config.model.preset={cfg.model.preset!r} is not a GPT-2 model; use a gpt2-* preset"
      )
    if vanilla is None:  # from scratch: a vanilla model with exactly the MoM's parameters
      return dataclasses.replace(config, n_layer=structure.vanilla_depth), None
  if config.vocab_size < vocab_size:
    raise experiment.ConfigError(
      f"the vocabulary ({vocab_size}) is larger than the model's ({config.vocab_size}); use the "
      "vanilla run's own vocabulary (data.vocab_path)"
    )
  try:
    return config, mom_bank(vanilla, structure, config.n_layer, rng)
  except MoMError as e:
    raise experiment.ConfigError(f"config.mom.init_from: {e}") from None


def train_mom(cfg) -> TrainResult:
  """Trains the MoM decoder ``cfg`` describes (module docstring)."""
  experiment.validate_config(cfg)
  structure = structure_from_config(cfg.mom)
  stored = None
  if cfg.mom.init_from:
    stored = load_vanilla(cfg)
    cfg = experiment.with_bank_vocabulary(cfg, cfg.mom.init_from)
  vocabulary = experiment.build_vocabulary(cfg)
  config, params = _starting_point(cfg, structure, vocabulary.vocab_size, stored)
  model = MoMGPT2(config, structure)
  log.info(
    "MoM from %s: %s; %d parameters",
    cfg.mom.init_from or cfg.model.init_from or "scratch",
    structure,
    _count(params if params is not None else jax.eval_shape(model.init, jax.random.key(0))),
  )
  loss_fn = mom_loss(model, label_smoothing=cfg.train.label_smoothing, z_loss=cfg.train.z_loss)
  meta = bank_meta(structure, config.n_layer)
  return train(
    cfg,
    loss_fn=loss_fn,
    init_params=params,
    frozen={},
    model=model,
    plans={},
    meta=meta,
    validate=False,
  )


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def load_mom_bank(directory) -> tuple[MoMGPT2, dict, bank_io.StoredBank]:
  """(MoM model, parameters, the stored bank) of a MoM run's workdir or saved bank."""
  stored = bank_io.load_bank(directory)
  structure = structure_from_meta(stored.meta)
  return MoMGPT2(stored.model.config, structure), stored.params, stored
