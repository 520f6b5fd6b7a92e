"""Builds what a run needs from its config: vocabulary, task, model, mesh. Shared by
``modjax.train`` and ``modjax.evaluate`` so both see exactly the same setup."""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import tempfile

import jax
from etils import epath

from modjax import data as data_lib
from modjax.core import registry, sharding
from modjax.core.errors import ConfigError  # re-exported: experiment.ConfigError
from modjax.core.model_config import DTYPES, GPT2Config, T5Config
from modjax.core.presets import PRESETS, get_preset
from modjax.core.run_config import with_values
from modjax.data import KNOWN_TASKS, pipeline, tasks, vocab
from modjax.models import architecture_for
from modjax.store import hf
from modjax.train.optim import OPTIMIZERS, SCHEDULES

log = logging.getLogger(__name__)


def maybe_initialize_distributed(cfg) -> None:
  """``jax.distributed.initialize()`` for multi-host runs (TPU pods need no arguments)."""
  mh = cfg.multihost
  if not mh.initialize or jax.distributed.is_initialized():  # a method may train several times
    return
  # Gloo for CPU collectives; set unconditionally, since asking for the backend here would
  # initialise it before jax.distributed.initialize() (the setting only affects CPU devices).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if mh.coordinator_address:
    kwargs = dict(
      coordinator_address=mh.coordinator_address,
      num_processes=mh.num_processes,
      process_id=mh.process_id,
    )
  jax.distributed.initialize(**kwargs)


def shutdown_distributed(cfg) -> None:
  """Every process of a multi-host run enters ``jax.distributed.shutdown``'s barrier before
  any leaves: process 0 hosts the coordination service, and a peer still leaving Python when
  process 0 drops it can hang or abort at exit."""
  if cfg.multihost.initialize and jax.distributed.is_initialized():
    jax.distributed.shutdown()


def workdir(cfg) -> epath.Path:
  if not cfg.workdir:
    raise ConfigError("config.workdir is empty; pass --config.workdir=/path/or/gs://bucket/run")
  return epath.Path(cfg.workdir)


def build_vocabulary(cfg):
  """The configured SentencePiece model, or one trained (once, by process 0) into the workdir."""
  d = cfg.data
  if d.vocab_path:
    return vocab.load_vocabulary(
      d.vocab_path, extra_ids=d.extra_ids, expected_size=d.expected_vocab_size or None
    )
  path = workdir(cfg) / "vocab" / "spm.model"
  if jax.process_index() == 0 and not path.exists():
    texts = training_texts(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info(
      "training a %d-piece SentencePiece vocabulary on %d texts -> %s",
      d.vocab_size,
      len(texts),
      path,
    )
    _train_vocabulary(texts, path, d.vocab_size)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("vocabulary")
  return vocab.load_vocabulary(os.fspath(path), extra_ids=0)


def _train_vocabulary(texts, path: epath.Path, vocab_size: int) -> None:
  """SentencePiece writes local files only: train in a temporary directory, then copy the
  model and its pieces to ``path`` (local or a gs:// workdir) through epath."""
  with tempfile.TemporaryDirectory() as local:
    model = vocab.train_sentencepiece(texts, os.path.join(local, "spm"), vocab_size)
    for suffix in (".model", ".vocab"):
      source = epath.Path(model[: -len(".model")] + suffix)
      if source.exists():
        source.copy(path.parent / f"spm{suffix}", overwrite=True)


def with_bank_vocabulary(cfg, bank_dir: epath.PathLike):
  """The config of a run over a stored bank: a copy of ``cfg`` that reads the bank's trained
  ``vocab/spm.model`` (no sentinels), unless ``data.vocab_path`` names one (then ``cfg`` itself):
  a new vocabulary would not match the bank's embeddings."""
  vocab_file = epath.Path(bank_dir) / "vocab" / "spm.model"
  if cfg.data.vocab_path or not vocab_file.exists():
    return cfg
  return with_values(cfg, {"data.vocab_path": os.fspath(vocab_file), "data.extra_ids": 0})


def training_texts(cfg) -> list[str]:
  d = cfg.data
  if d.task == "embedded_lead":
    return tasks.embedded_corpus_texts()
  if d.task in ("jsonl", "tsv"):
    if d.task == "jsonl":
      source = data_lib.jsonl_source(file_spec(cfg), **_json_fields(cfg))
    else:
      source = data_lib.tsv_source(file_spec(cfg))
    texts = []
    for inputs, targets in source.examples(d.train_split):
      texts += [inputs, targets]
    return texts
  raise ConfigError(
    f"data.vocab_path is empty and task {d.task!r} has no local text to train a vocabulary on; "
    "set --config.data.vocab_path to a SentencePiece .model (T5's for real runs)"
  )


def file_spec(cfg):
  d = cfg.data
  spec = {}
  if d.train_files:
    spec[d.train_split] = d.train_files
  if d.validation_files:
    spec[d.eval_split] = d.validation_files
  if d.task in ("jsonl", "tsv") and not spec:
    raise ConfigError(
      f"task {d.task!r} needs files: set --config.data.train_files (and validation_files)"
    )
  return spec or None


def build_task(cfg, vocabulary):
  d = cfg.data
  return tasks.get_task(
    d.task,
    vocabulary,
    files=file_spec(cfg),
    inputs_prefix=d.inputs_prefix or None,
    **_json_fields(cfg),
    tfds_data_dir=d.tfds_data_dir or None,
  )


def _json_fields(cfg) -> dict:
  """The JSON fields a jsonl task reads (other tasks have fixed features)."""
  if cfg.data.task != "jsonl":
    return {}
  return {"inputs_field": cfg.data.inputs_field, "targets_field": cfg.data.targets_field}


def model_config(cfg, vocab_size: int) -> T5Config | GPT2Config:
  """The model's config: an HF checkpoint's, or a preset resized to the vocabulary."""
  m = cfg.model
  dtypes = dict(param_dtype=m.param_dtype, dtype=m.dtype)
  if m.init_from:
    config = hf.read_config(m.init_from, **dtypes)
  else:
    config = dataclasses.replace(
      get_preset(m.preset), vocab_size=_round_up(vocab_size, 128), **dtypes
    )
  if m.dropout_rate >= 0 and isinstance(config, T5Config):
    config = dataclasses.replace(config, dropout_rate=m.dropout_rate)
  if config.vocab_size < vocab_size:
    raise ConfigError(
      f"the model's vocabulary ({config.vocab_size}) is smaller than the data's ({vocab_size}); "
      "use the checkpoint's own SentencePiece model (data.vocab_path)"
    )
  return config


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def build_model(cfg, vocab_size: int):
  """(architecture, initial numpy params or None) — params are set when starting from HF."""
  config = model_config(cfg, vocab_size)
  params = None
  if cfg.model.init_from:
    _, params = hf.import_checkpoint(cfg.model.init_from, cfg.model.param_dtype, cfg.model.dtype)
  return architecture_for(config), params


def build_mesh(cfg):
  devices = jax.devices()
  n = cfg.mesh.num_devices
  if n < 0 or n > len(devices):
    raise ConfigError(
      f"config.mesh.num_devices={n} is invalid: {len(devices)} devices exist; use 0 (all) up to {len(devices)}"
    )
  m = cfg.mesh
  dcn = {axis: m[f"dcn_{axis}"] for axis in sharding.MESH_AXES}
  return sharding.make_mesh(
    m.data, m.fsdp, m.tensor, m.expert, devices=devices[:n] if n else devices, dcn=dcn
  )


def feature_lengths(cfg, model) -> dict:
  if model.kind == "lm":
    return {"targets": cfg.data.targets_length}
  return {"inputs": cfg.data.inputs_length, "targets": cfg.data.targets_length}


def train_batches(cfg, model, task, start_batch: int):
  """This process's training batches, resumable from ``start_batch``.

  ``data.host_split='rows'``: every process reads the same global batch and keeps its rows
  (results identical to one process); ``'source'``: each reads a disjoint shard of the source
  (no duplicated reading; use for large TFDS tasks on pods).
  """
  d = cfg.data
  by_source = d.host_split == "source" and jax.process_count() > 1
  return pipeline.make_batches(
    task,
    d.train_split,
    feature_lengths=feature_lengths(cfg, model),
    batch_size=cfg.train.batch_size,
    pack=d.pack,
    seed=d.seed,
    shuffle=d.shuffle,
    num_epochs=None,
    start_batch=start_batch,
    process_index=jax.process_index() if by_source else 0,
    process_count=jax.process_count() if by_source else 1,
    model_type=model.kind,
  )


def validate_config(cfg) -> None:
  """Rejects values that cannot work, before anything is created or overwritten."""

  def need(ok: bool, key: str, value, fix: str):
    if not ok:
      raise ConfigError(f"config.{key}={value!r} is invalid: {fix}")

  workdir(cfg)
  _validate_method(cfg, need)
  _validate_model(cfg.model, need)
  _validate_data(cfg.data, need)
  _validate_training(cfg.train, cfg.optimizer, need)
  _validate_mesh(cfg.mesh, need)
  _validate_plateau(cfg.train, need)
  c = cfg.checkpoint
  need(c.every_steps > 0, "checkpoint.every_steps", c.every_steps, "use a positive interval")
  need(c.keep >= 1, "checkpoint.keep", c.keep, "keep at least 1 checkpoint")
  _validate_eval(cfg.eval, need)


def _validate_method(cfg, need) -> None:
  known = registry.methods()
  need(cfg.method in known, "method", cfg.method, f"use one of {sorted(known)}")
  need(
    known[cfg.method].add_defaults is None or cfg.method in cfg,
    "method",
    cfg.method,
    "the config lacks the method's section; start it from "
    "modjax.train.defaults.with_method(config, name) (configs/modular_t5.py)",
  )


def _validate_model(m, need) -> None:
  need(
    m.preset in PRESETS or bool(m.init_from),
    "model.preset",
    m.preset,
    f"choose one of {sorted(PRESETS)}",
  )
  need(
    not m.init_from or os.path.isdir(m.init_from),
    "model.init_from",
    m.init_from,
    "give an existing save_pretrained directory",
  )
  for key in ("param_dtype", "dtype"):
    need(m[key] in DTYPES, f"model.{key}", m[key], f"choose one of {sorted(DTYPES)}")


def _validate_data(d, need) -> None:
  need(d.task in KNOWN_TASKS, "data.task", d.task, f"choose one of {sorted(KNOWN_TASKS)}")
  need(
    d.host_split in ("rows", "source"), "data.host_split", d.host_split, "use 'rows' or 'source'"
  )
  need(d.inputs_length > 0, "data.inputs_length", d.inputs_length, "use a positive length")
  need(d.targets_length > 0, "data.targets_length", d.targets_length, "use a positive length")
  need(d.vocab_size >= 16, "data.vocab_size", d.vocab_size, "use at least 16 pieces")
  for key in ("train_files", "validation_files"):
    pattern = d[key]
    if pattern and not pattern.startswith("gs://"):
      need(bool(glob.glob(pattern)), f"data.{key}", pattern, "no file matches; check the path")
  if d.vocab_path and not d.vocab_path.startswith("gs://"):
    need(
      os.path.isfile(d.vocab_path),
      "data.vocab_path",
      d.vocab_path,
      "no such file; give a SentencePiece .model",
    )


def _validate_training(t, o, need) -> None:
  need(t.batch_size > 0, "train.batch_size", t.batch_size, "use a positive global batch size")
  need(t.num_steps > 0, "train.num_steps", t.num_steps, "use a positive number of steps")
  need(t.num_microbatches > 0, "train.num_microbatches", t.num_microbatches, "use 1 or more")
  need(
    t.batch_size % t.num_microbatches == 0,
    "train.num_microbatches",
    t.num_microbatches,
    f"it must divide train.batch_size={t.batch_size}",
  )
  need(t.log_every > 0, "train.log_every", t.log_every, "use a positive interval")
  need(
    0.0 <= t.label_smoothing < 1.0,
    "train.label_smoothing",
    t.label_smoothing,
    "use a value in [0, 1)",
  )
  need(t.profile_steps >= 0, "train.profile_steps", t.profile_steps, "use 0 (off) or a count")
  need(t.profile_start >= 1, "train.profile_start", t.profile_start, "use 1 or more steps")
  need(o.name in OPTIMIZERS, "optimizer.name", o.name, f"choose one of {OPTIMIZERS}")
  need(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"choose one of {SCHEDULES}")
  need(
    o.learning_rate > 0 and math.isfinite(o.learning_rate),
    "optimizer.learning_rate",
    o.learning_rate,
    "use a positive number",
  )
  need(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "use 0 (off) or a positive norm")


def _validate_eval(e, need) -> None:
  need(e.batch_size > 0, "eval.batch_size", e.batch_size, "use a positive batch size")
  need(e.num_beams > 0, "eval.num_beams", e.num_beams, "use 1 (greedy) or more")
  need(e.max_new_tokens > 0, "eval.max_new_tokens", e.max_new_tokens, "use a positive number")
  for name in filter(None, e.metrics.split(",")):
    need(
      name.strip() in ("rouge", "bleu", "perplexity"),
      "eval.metrics",
      e.metrics,
      "use rouge, bleu and/or perplexity",
    )


def _validate_plateau(t, need) -> None:
  """Validation-loss checks during training (``modjax.train.validation``)."""
  need(t.eval_every >= 0, "train.eval_every", t.eval_every, "use 0 (off) or a step interval")
  need(
    t.eval_max_examples >= 0,
    "train.eval_max_examples",
    t.eval_max_examples,
    "use 0 (the whole split) or a positive count",
  )
  need(
    t.plateau_window == 0 or (t.eval_every > 0 and t.plateau_window >= t.eval_every),
    "train.plateau_window",
    t.plateau_window,
    "use 0 (never stop early) or a window of at least train.eval_every steps (set eval_every)",
  )
  need(
    0 < t.plateau_min_improvement < 1,
    "train.plateau_min_improvement",
    t.plateau_min_improvement,
    "use a relative improvement in (0, 1), e.g. 0.01",
  )


def _validate_mesh(m, need) -> None:
  """Mesh sizes that no device count can satisfy; ``sharding.make_mesh`` checks the rest
  against the devices (and slices) it finds."""
  for axis in sharding.MESH_AXES:
    need(m[axis] == -1 or m[axis] > 0, f"mesh.{axis}", m[axis], "use a positive size or -1")
    key = f"dcn_{axis}"
    need(m[key] > 0, f"mesh.{key}", m[key], "use a positive number of slices (1: one slice)")
  wildcards = [f"mesh.{a}" for a in sharding.MESH_AXES if m[a] == -1]
  need(len(wildcards) <= 1, "mesh", wildcards, "set at most one mesh axis to -1")
  need(m.num_devices >= 0, "mesh.num_devices", m.num_devices, "use 0 (all devices) or a count")


def load_eval_vocabulary(cfg, vocab_dir=None):
  """``data.vocab_path``, else the vocabulary in ``vocab_dir`` or the workdir (a trained
  ``vocab/spm.model``, a copied ``vocab/tokenizer.json``, a Hugging Face directory's
  ``tokenizer.json``; ``vocab.find_vocabulary``). Never trains one: a new vocabulary would not
  match the model's embeddings."""
  d = cfg.data
  if d.vocab_path:
    return vocab.load_vocabulary(
      d.vocab_path, extra_ids=d.extra_ids, expected_size=d.expected_vocab_size or None
    )
  for root in (vocab_dir, workdir(cfg)):
    found = vocab.find_vocabulary(root) if root is not None else None
    if found:
      return vocab.load_vocabulary(found, extra_ids=0)
  raise ConfigError(
    "config.data.vocab_path is empty and neither the bank nor the workdir holds vocab/spm.model "
    "or a tokenizer.json; set --config.data.vocab_path to the vocabulary the bank was trained with"
  )
