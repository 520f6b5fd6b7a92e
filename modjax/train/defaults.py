"""The full set of run settings with defaults. Every ``configs/*.py`` starts from
:func:`base_config` and changes values; the result is locked, so a misspelt key is an error."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from modjax.core import registry


def base_config() -> ml_collections.ConfigDict:
  """Every setting a run reads, with its default, one section per concern."""
  c = ml_collections.ConfigDict()
  c.workdir = ""  # checkpoints, summaries, vocabulary, metrics; local path or gs:// URL
  # What `python -m modjax.train` runs: "finetune" (the task loss on the whole model) or a
  # method's training, whose config section that method's defaults add (e.g. "modular").
  c.method = "finetune"
  c.model = _model_section()
  c.data = _data_section()
  c.train = _train_section()
  c.optimizer = _optimizer_section()
  c.mesh = _mesh_section()
  c.checkpoint = _checkpoint_section()
  c.eval = _eval_section()
  c.multihost = _multihost_section()
  return c


def _model_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = "tiny"  # modjax.core.presets.PRESETS
  c.init_from = ""  # a Hugging Face save_pretrained directory to fine-tune instead
  c.param_dtype = "float32"
  c.dtype = "float32"  # compute dtype: float32 or bfloat16
  c.dropout_rate = -1.0  # < 0: keep the preset's / checkpoint's
  return c


def _data_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "embedded_lead"  # modjax.data.KNOWN_TASKS
  c.train_files = ""  # jsonl/tsv tasks: path or glob
  c.validation_files = ""
  c.inputs_prefix = ""  # "" = the task's standard prefix
  c.inputs_field = "inputs"  # jsonl: the JSON fields read as inputs and targets (an LM
  c.targets_field = "targets"  # trains on the targets: "inputs" makes it model the inputs)
  c.tfds_data_dir = ""
  c.vocab_path = ""  # SentencePiece .model; "" = train one on the training texts
  c.vocab_size = 1024  # size of that trained vocabulary
  c.extra_ids = 100  # sentinels appended to a given vocab_path (T5: 100)
  c.expected_vocab_size = 0  # > 0: check the loaded vocabulary has this size (T5: 32100)
  c.inputs_length = 128
  c.targets_length = 32
  c.pack = False
  c.shuffle = True
  c.seed = 0
  c.host_split = "rows"  # "rows": same stream, each host keeps its rows; "source": shards
  c.train_split = "train"
  c.eval_split = "validation"
  return c


def _train_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 32  # global
  c.num_steps = 300
  c.num_microbatches = 1
  c.seed = 0
  c.log_every = 10
  c.label_smoothing = 0.0
  c.z_loss = 0.0
  # Validation loss during training (modjax.train.validation): every N steps (0 = off) on the
  # first eval_max_examples examples of data.eval_split (0 = all); stop once the best loss fell by
  # less than plateau_min_improvement (relative) over the last plateau_window steps (0 = never).
  c.eval_every = 0
  c.eval_max_examples = 0
  c.plateau_window = 0
  c.plateau_min_improvement = 0.01
  # A jax.profiler trace of profile_steps steps (0 = off), starting profile_start steps after
  # the run (or its resumption) begins, so compilation is over; into workdir/tensorboard.
  c.profile_steps = 0
  c.profile_start = 5
  return c


def _optimizer_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "adafactor"  # adafactor | adamw
  c.learning_rate = 0.01
  c.schedule = "rsqrt"  # constant | rsqrt | cosine | linear
  c.warmup_steps = 100
  c.grad_clip = 1.0  # global-norm clipping; 0 = off
  c.weight_decay = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.adafactor_decay_rate = 0.8
  c.adafactor_parameter_scale = True
  c.adafactor_clipping = 0.0  # > 0: each update's RMS clipped at this (optax's 1.0)
  return c


def _mesh_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = -1  # -1: all devices not used by the other axes
  c.fsdp = 1
  c.tensor = 1
  c.expert = 1
  c.num_devices = 0  # 0: every device; N: the first N (e.g. compare 1 vs 8 devices)
  # Multi-slice: slices along each axis, over the data-center network (DCN). With any > 1 the
  # sizes above count devices inside one slice (ICI); the product of these is the slice count.
  c.dcn_data = 1
  c.dcn_fsdp = 1
  c.dcn_tensor = 1
  c.dcn_expert = 1
  return c


def _checkpoint_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 100
  c.keep = 3
  c.async_save = True
  return c


def _eval_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.max_examples = 200  # 0 = the whole split
  c.batch_size = 32
  c.num_beams = 1
  c.max_new_tokens = 32
  c.metrics = "rouge"  # comma-separated: rouge, bleu
  c.bleu_tokenize = "13a"
  return c


def _multihost_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.initialize = False  # call jax.distributed.initialize()
  c.coordinator_address = ""  # only for local multi-process runs; pods need none
  c.num_processes = 0
  c.process_id = -1
  return c


def converge(c: ml_collections.ConfigDict, *, cap: int, every: int, window: int) -> None:
  """Trains ``c`` until its validation loss improves by less than 1% over ``window`` steps
  (about an epoch), scored on the whole validation split every ``every`` steps, ``cap`` steps at
  most; a checkpoint at every score, and the best kept in ``workdir/best``."""
  c.train.num_steps = cap
  c.train.eval_every = every
  c.train.eval_max_examples = 0
  c.train.plateau_window = window
  c.train.plateau_min_improvement = 0.01
  c.checkpoint.every_steps = every


def jsonl_corpus(c: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
  """Points ``c.data`` at a corpus folder of ``train.jsonl.gz`` and ``validation.jsonl.gz``
  (../shared/data's layout) and scores the whole validation split."""
  c.data.task = "jsonl"
  c.data.train_files = os.path.join(data_dir, "train.jsonl.gz")
  c.data.validation_files = os.path.join(data_dir, "validation.jsonl.gz")
  c.eval.max_examples = 0
  return c


def with_method(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """``c`` training method ``name``: ``config.method`` set and the method's config section added
  with its defaults (``modjax.core.registry``)."""
  with c.unlocked():
    c.method = name
    add_defaults = registry.method(name).add_defaults
    if add_defaults is not None:
      add_defaults(c)
  return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c


def sibling_module(config_file: str, file_name: str):
  """The config module ``file_name`` in the folder of ``config_file`` (a config's own
  ``__file__``): ``configs/`` is a folder of files, not a package."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), file_name)
  name = f"modjax_configs_{os.path.splitext(file_name)[0]}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling_config(config_file: str, file_name: str, arg: str = ""):
  """``get_config(arg)`` of the config file ``file_name`` beside ``config_file`` (its default
  arg when ``arg`` is empty)."""
  module = sibling_module(config_file, file_name)
  return module.get_config(arg) if arg else module.get_config()


def load_config(spec: str):
  """The ConfigDict that ``--config=spec`` gives (``path/to/config.py[:arg]``), for notebooks
  and scripts that call the library instead of a command line."""
  path, _, arg = str(spec).partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist; pass configs/<name>.py[:arg]")
  return sibling_config(path, os.path.basename(path), arg)
