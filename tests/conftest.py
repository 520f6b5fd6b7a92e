"""Shared fixtures: tiny Hugging Face models with random weights, built and saved locally.

Nothing here touches the network: models are constructed from a config with ``torch``'s
seeded random init and written with ``save_pretrained`` into pytest's tmp dirs. JAX is pinned
to CPU (a test module may still add XLA flags before JAX initialises its backend, so nothing
here runs a JAX computation at import time).
"""

import os

# Eight fake CPU devices for the sharding and training tests; set before anything imports JAX.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

# Tiny shapes: different encoder/decoder depths, and few relative-position buckets with a small
# max_distance, so sequences of ~20 tokens reach the logarithmic (long-distance) buckets.
TINY_T5 = dict(
  vocab_size=128,
  d_model=32,
  d_kv=8,
  d_ff=64,
  num_heads=4,
  num_layers=2,
  num_decoder_layers=3,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=12,
  dropout_rate=0.0,
)
TINY_GPT2 = dict(
  vocab_size=128,
  n_positions=64,
  n_embd=32,
  n_layer=3,
  n_head=4,
  resid_pdrop=0.0,
  embd_pdrop=0.0,
  attn_pdrop=0.0,
)

# kind -> (model family, config overrides on top of the tiny shapes).
# "t5_v1_0": ReLU FFN, tied head, decoder output rescaled by d_model**-0.5.
# "t5_v1_1": gated-GELU; transformers 5.x turns tie_word_embeddings=False into a tied head
#            with scale_decoder_outputs=False.
# "t5_gelu": non-gated FFN with the exact (erf) GELU, which HF keeps apart from gated-gelu's tanh
#            approximation (gelu_new).
HF_KINDS = {
  "t5_v1_0": ("t5", dict(feed_forward_proj="relu")),
  "t5_gelu": ("t5", dict(feed_forward_proj="gelu")),
  "t5_v1_1": ("t5", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
  "gpt2": ("gpt2", {}),
}


def build_hf_model(kind: str, seed: int = 0, **overrides):
  """A float32, eval-mode transformers model of ``kind`` (see HF_KINDS) with seeded weights."""
  import torch
  import transformers

  transformers.logging.set_verbosity_error()
  family, extra = HF_KINDS[kind]
  torch.manual_seed(seed)
  if family == "t5":
    config = transformers.T5Config(**{**TINY_T5, **extra, **overrides})
    model = transformers.T5ForConditionalGeneration(config)
  else:
    config = transformers.GPT2Config(**{**TINY_GPT2, **extra, **overrides})
    model = transformers.GPT2LMHeadModel(config)
  return model.float().eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
  """``hf_checkpoint(kind) -> (directory, model)``: a tiny HF model saved once per session.

  The directory and the model are shared by every test: copy the directory before changing it
  and never modify the model in place.
  """
  cache = {}

  def get(kind: str):
    if kind not in cache:
      model = build_hf_model(kind)
      directory = tmp_path_factory.mktemp(f"hf_{kind}")
      model.save_pretrained(directory)
      cache[kind] = (str(directory), model)
    return cache[kind]

  return get


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """After each test module, drop JAX's in-memory compiled programs and collect garbage: one
  pytest process runs every module's models, and their executables would otherwise pile up."""
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def jax_compilation_cache_dir(tmp_path_factory):
  """A persistent XLA compilation cache directory shared by one test run: every test, every
  subprocess it starts (through the environment) and, under pytest-xdist, every worker (the
  run's common temporary directory), so the same small programs compile once per run."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = root / "jax_compilation_cache"
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope="session", autouse=True)
def _persistent_compilation_cache(jax_compilation_cache_dir):
  from train_helpers import compilation_cache

  with compilation_cache(jax_compilation_cache_dir):
    yield


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
  """``(config, TrainResult)`` of the micro config trained in-process for 30 steps on one device
  (checkpoints every 5 steps), shared by the training and fault-tolerance tests: do not write into
  its workdir except under ``eval/``."""
  from train_helpers import micro_config

  from modjax.train.loop import train

  cfg = micro_config(
    tmp_path_factory.mktemp("micro_run"),
    mesh__num_devices=1,
    train__num_steps=30,
    checkpoint__every_steps=5,
  )
  return cfg, train(cfg)
