"""Training a MoM decoder: ``python -m modjax.train --config configs/mom_gpt2.py:<size>``.

Phase two of the paper when ``mom.init_from`` names a vanilla GPT-2 run's workdir or a saved
bank (its vocabulary becomes the run's; its layers map into the pools, routers start fresh);
from scratch otherwise (a fresh vanilla GPT-2 of the same parameters, mapped the same way), or
from a Hugging Face GPT-2 checkpoint with ``model.init_from``. Checkpoints, resume, sharding
and metrics are the generic loop's; the workdir is a bank that ``modjax.store.bank_io.load_bank``
reads (``model.json`` says ``gpt2``: the vanilla config the pools stand for; the MoM structure
is in ``entries.json``; :func:`load_mom_bank` gives the MoM model back).

``mom.baseline`` trains a vanilla GPT-2 baseline of the same MoM instead (:mod:`.baselines`:
the MoM's layers, or its parameters with the routers' as wider FFNs or extra layers), from the
same starting point. ``mom.continue_schedule`` (with ``mom.init_from`` a training workdir) goes
on with the learning-rate schedule that run was on, from its step, with no new warm-up
(:func:`continue_schedule`). Every run writes ``compute.json`` (:mod:`.records`: parameters,
training FLOPs, the capacity drop rate over the run).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import ml_collections
from etils import epath

from modjax.core.model_config import GPT2Config
from modjax.core.registry import Method
from modjax.core.run_config import with_values
from modjax.methods.mom import baselines, records
from modjax.methods.mom.loss import mom_loss
from modjax.methods.mom.model import MoMGPT2, bank_model
from modjax.methods.mom.pools import bank_meta, mom_bank, structure_from_meta
from modjax.methods.mom.structure import MoMConfig, MoMError
from modjax.store import bank_io, checkpoint
from modjax.train import experiment
from modjax.train.loop import TrainResult, train

log = logging.getLogger(__name__)
RUN_KEYS = ("init_from", "baseline", "continue_schedule")  # the mom section's non-structure keys
DECAYING = ("cosine", "linear")  # schedules whose rate is 0 at their end


def add_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``mom`` section: :class:`MoMConfig`'s fields and defaults, plus the run's own keys;
  and the optimizer's schedule offset (``modjax.train.optim.make_optimizer``)."""
  c.method = "mom"
  c.mom = ml_collections.ConfigDict(MoMConfig().to_dict())
  c.mom.init_from = ""  # a vanilla GPT-2 workdir or bank; "" = from scratch
  c.mom.baseline = ""  # "" = the MoM; vanilla | wider_ffn | extra_layer (baselines.py)
  c.mom.continue_schedule = False  # continue init_from's learning-rate schedule from its step
  c.optimizer.schedule_start = 0  # step s takes the schedule's rate at schedule_start + s
  c.optimizer.schedule_steps = 0  # the schedule's length; 0 = schedule_start + train.num_steps
  return c


def structure_from_config(section) -> MoMConfig:
  """The structure a config's ``mom`` section describes (one-line ConfigError when invalid)."""
  values = {k: v for k, v in section.to_dict().items() if k not in RUN_KEYS}
  try:
    return MoMConfig.from_dict(values)
  except MoMError as e:
    raise experiment.ConfigError(f"config.{e}") from None


def _baseline_kind(cfg) -> str:
  kind = cfg.mom.get("baseline", "")
  if kind and kind not in baselines.BASELINES:
    raise experiment.ConfigError(
      f"config.mom.baseline={kind!r} is invalid: use '' (the MoM) or one of {baselines.BASELINES}"
    )
  return kind


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


def continue_schedule(cfg, stored: bank_io.StoredBank | None):
  """A copy of ``cfg`` whose optimizer is on the schedule the run at ``mom.init_from`` was on
  (its name, rate, warm-up and length, from its checkpoint's config) starting at its step, so
  this run's first step takes the rate that run's next step would have: no new warm-up. An
  explicit ``optimizer.schedule_steps`` replaces that run's length (a longer phase two)."""
  if not cfg.mom.init_from:
    raise experiment.ConfigError(
      "config.mom.continue_schedule=True needs config.mom.init_from: the training workdir "
      "whose schedule to continue"
    )
  where = f"config.mom.continue_schedule: mom.init_from={cfg.mom.init_from!r}"
  if stored is None or stored.step is None:
    raise experiment.ConfigError(
      f"{where} is not a training workdir (no checkpoint records a step and schedule); give "
      "the vanilla run's workdir, or leave continue_schedule off"
    )
  step, source = _recorded_config(cfg.mom.init_from)
  if source is None:
    raise experiment.ConfigError(f"{where}: its checkpoint records no config to continue")
  o, mine = source["optimizer"], cfg.optimizer
  position = o.get("schedule_start", 0) + step
  length = mine.schedule_steps or o.get("schedule_steps", 0)
  length = length or o.get("schedule_start", 0) + source["train"]["num_steps"]
  if o["schedule"] in DECAYING and position >= length:
    raise experiment.ConfigError(
      f"{where} is at step {position} of its {length}-step {o['schedule']} schedule, where the "
      f"learning rate is 0; give a longer one (--config.optimizer.schedule_steps=N, N > "
      f"{position}) or continue a run that stopped earlier (at a validation plateau)"
    )
  continued = {"schedule_start": position, "schedule_steps": length}
  for key in ("schedule", "learning_rate", "warmup_steps"):
    if mine[key] != o[key]:
      log.info("optimizer.%s: %r (the continued run's) replaces %r", key, o[key], mine[key])
    continued[key] = o[key]
  log.info(
    "continuing the %s schedule of %s at step %d of %d",
    o["schedule"],
    cfg.mom.init_from,
    position,
    length,
  )
  return with_values(cfg, {f"optimizer.{key}": value for key, value in continued.items()})


def _recorded_config(workdir) -> tuple[int, dict | None]:
  """(step, run config) of a training workdir's latest good checkpoint."""
  ckpt = checkpoint.Checkpointer(
    str(epath.Path(workdir) / "checkpoints"),
    max_to_keep=None,
    save_interval_steps=1,
    async_save=False,
  )
  try:
    restored = ckpt.restore_latest(None)
  finally:
    ckpt.close()
  if restored is None:
    return 0, None
  return restored[0], restored[2].get("config")


def _vanilla_start(cfg, structure: MoMConfig, vocab_size: int, stored):
  """(GPT-2 config the pools stand for, its parameters, or None from scratch)."""
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
  return config, vanilla


def mom_model_for_config(cfg) -> MoMGPT2:
  """The MoM decoder ``cfg`` trains, from the configs and ``model.json`` alone (nothing is
  trained, loaded or written; a vocabulary still to be trained counts ``data.vocab_size``)."""
  structure = structure_from_config(cfg.mom)
  if cfg.mom.init_from:
    path = epath.Path(cfg.mom.init_from)
    if not bank_io.is_bank(path):
      raise experiment.ConfigError(f"config.mom.init_from={str(path)!r} holds no bank")
    config = bank_io.config_from_dict(json.loads((path / "model.json").read_text()))
  else:
    size = experiment.build_vocabulary(cfg).vocab_size if cfg.data.vocab_path else 0
    config = experiment.model_config(cfg, size or cfg.data.vocab_size)
    if not cfg.model.init_from:
      config = dataclasses.replace(config, n_layer=structure.vanilla_depth)
  if not isinstance(config, GPT2Config):
    raise experiment.ConfigError("Mixture-of-Modules needs a GPT-2 model; use a gpt2-* preset")
  return MoMGPT2(config, structure)


def train_mom(cfg) -> TrainResult:
  """Trains the MoM decoder ``cfg`` describes, or its ``mom.baseline`` (module docstring)."""
  experiment.validate_config(cfg)
  structure = structure_from_config(cfg.mom)
  kind = _baseline_kind(cfg)
  stored = None
  if cfg.mom.init_from:
    stored = load_vanilla(cfg)
    cfg = experiment.with_bank_vocabulary(cfg, cfg.mom.init_from)
  if cfg.mom.continue_schedule:
    cfg = continue_schedule(cfg, stored)
  vocabulary = experiment.build_vocabulary(cfg)
  config, vanilla = _vanilla_start(cfg, structure, vocabulary.vocab_size, stored)
  model = MoMGPT2(config, structure)
  mom_params = baselines.count_params(model)
  if kind:
    return _train_baseline(cfg, kind, model, vanilla, mom_params)
  params = None
  if vanilla is not None:
    try:
      params = mom_bank(vanilla, structure, config.n_layer, jax.random.key(cfg.train.seed))
    except MoMError as e:
      raise experiment.ConfigError(f"config.mom.init_from: {e}") from None
  start = cfg.mom.init_from or cfg.model.init_from or "scratch"
  log.info("MoM from %s: %s; %d parameters", start, structure, mom_params)
  loss_fn = mom_loss(model, label_smoothing=cfg.train.label_smoothing, z_loss=cfg.train.z_loss)
  meta = bank_meta(structure, config.n_layer)
  result = train(
    cfg,
    loss_fn=loss_fn,
    init_params=params,
    frozen={},
    model=model,
    plans={},
    meta=meta,
    validate=False,
  )
  routers = baselines.router_params(structure, config.n_embd)
  counts = {"params": mom_params, "router_params": routers, "mom_params": mom_params}
  records.write_compute(
    cfg, experiment.workdir(cfg), model, kind="mom", steps=result.last_step, params=counts
  )
  return result


def _train_baseline(cfg, kind: str, mom: MoMGPT2, vanilla, mom_params: int) -> TrainResult:
  """Trains baseline ``kind`` of ``mom``; in phase two grown from the ``vanilla`` original."""
  try:
    gpt2 = baselines.baseline_model(kind, mom)
  except MoMError as e:
    raise experiment.ConfigError(f"config.{e}") from None
  init = vanilla
  if vanilla is not None and kind != "vanilla":
    init = baselines.grow(vanilla, mom.config, gpt2.config, jax.random.key(cfg.train.seed))
  params = baselines.count_params(gpt2)
  log.info(
    "vanilla baseline %s: %d layers, d_ff %d, %d parameters (the MoM's: %d, %+.2f%%)",
    kind,
    gpt2.config.n_layer,
    gpt2.config.d_ff,
    params,
    mom_params,
    100 * (params - mom_params) / mom_params,
  )
  result = train(cfg, init_params=init, model=gpt2, validate=False)
  counts = {"params": params, "router_params": 0, "mom_params": mom_params}
  records.write_compute(
    cfg, experiment.workdir(cfg), gpt2, kind=kind, steps=result.last_step, params=counts
  )
  return result


def load_mom_bank(directory) -> tuple[MoMGPT2, dict, bank_io.StoredBank]:
  """(MoM model, parameters, the stored bank) of a MoM run's workdir or saved bank."""
  stored = bank_io.load_bank(directory)
  structure = structure_from_meta(stored.meta)
  return MoMGPT2(stored.model.config, structure), stored.params, stored


METHOD = Method("mom", run=train_mom, add_defaults=add_defaults, bank_model=bank_model)
