"""Hugging Face checkpoint import/export: exact round trips, sharding, and clear errors."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import TINY_GPT2, TINY_T5  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from modjax.core.model_config import GPT2Config, T5Config  # noqa: E402
from modjax.models import architecture_for  # noqa: E402
from modjax.store.hf import (  # noqa: E402
  INDEX,
  SAFETENSORS,
  HFInteropError,
  export_checkpoint,
  import_checkpoint,
  read_config,
)

# Non-default values everywhere a field could silently fall back to its default.
CONFIGS = {
  "t5_v1_0": T5Config(**{**TINY_T5, "dropout_rate": 0.05, "layer_norm_epsilon": 1e-5}),
  "t5_v1_1_untied": T5Config(
    **TINY_T5,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
  ),
  "gpt2": GPT2Config(**TINY_GPT2, n_inner=48, layer_norm_epsilon=1e-6, pad_token_id=3),
}


def _bank(config, seed=0):
  """Random float32 parameters in the bank layout (numpy: much faster than compiling init)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(architecture_for(config).init, jax.random.key(0))
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _hf_class(config):
  if isinstance(config, T5Config):
    return transformers.T5ForConditionalGeneration
  return transformers.GPT2LMHeadModel


def _hf_logits(directory, config):
  model = _hf_class(config).from_pretrained(directory).eval()
  rng = np.random.default_rng(0)
  ids = torch.from_numpy(rng.integers(2, config.vocab_size, (2, 9)))
  with torch.no_grad():
    if isinstance(config, T5Config):
      return model(input_ids=ids, decoder_input_ids=ids[:, :5], use_cache=False).logits.numpy()
    return model(input_ids=ids, use_cache=False).logits.numpy()


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _edit_tensors(directory, edit):
  path = os.path.join(directory, SAFETENSORS)
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _error(directory) -> str:
  with pytest.raises(HFInteropError) as info:
    import_checkpoint(directory)
  message = str(info.value)
  assert "\n" not in message, f"error message is not one line: {message!r}"
  return message


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_export_then_import_is_exact(tmp_path, kind):
  config, params = CONFIGS[kind], _bank(CONFIGS[kind])
  directory = export_checkpoint(config, params, str(tmp_path / kind))
  assert sorted(os.listdir(directory)) == ["config.json", SAFETENSORS]
  config2, params2 = import_checkpoint(directory)
  assert config2 == config
  _assert_trees_equal(params2, params)


@pytest.mark.parametrize("kind", ["t5_v1_0", "gpt2"])
def test_sharded_export_imports_exactly_and_loads_in_hf(tmp_path, kind):
  config, params = CONFIGS[kind], _bank(CONFIGS[kind], seed=1)
  single = export_checkpoint(config, params, str(tmp_path / "single"))
  sharded = export_checkpoint(config, params, str(tmp_path / "sharded"), max_shard_bytes=20_000)
  files = sorted(os.listdir(sharded))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert INDEX in files and SAFETENSORS not in files and len(shards) > 2
  index = json.load(open(os.path.join(sharded, INDEX)))
  assert sorted(set(index["weight_map"].values())) == shards
  assert set(index["weight_map"]) == set(load_file(os.path.join(single, SAFETENSORS)))
  config2, params2 = import_checkpoint(sharded)
  assert config2 == config
  _assert_trees_equal(params2, params)
  np.testing.assert_array_equal(_hf_logits(sharded, config), _hf_logits(single, config))


@pytest.mark.parametrize("kind", ["t5_v1_0", "t5_v1_1", "gpt2"])
def test_hf_saved_checkpoint_reexports_to_identical_hf_model(hf_checkpoint, tmp_path, kind):
  directory, _ = hf_checkpoint(kind)
  config, params = import_checkpoint(directory)
  out = export_checkpoint(config, params, str(tmp_path / "out"))
  assert read_config(out) == config
  _assert_trees_equal(import_checkpoint(out)[1], params)
  np.testing.assert_array_equal(_hf_logits(out, config), _hf_logits(directory, config))


@pytest.mark.parametrize("kind", ["t5_v1_0", "t5_v1_1_untied"])
def test_transformers_4x_config_without_scale_key(tmp_path, kind):
  # transformers 4.x wrote no scale_decoder_outputs: the rescale follows tie_word_embeddings
  # (v1.0: tied and rescaled; v1.1 / Flan-T5: untied lm_head.weight, unscaled).
  config = CONFIGS[kind]
  directory = export_checkpoint(config, _bank(config), str(tmp_path / "ckpt"))
  path = os.path.join(directory, "config.json")
  raw = json.load(open(path))
  assert raw["tie_word_embeddings"] == config.tie_word_embeddings
  del raw["scale_decoder_outputs"]
  json.dump(raw, open(path, "w"))
  assert read_config(directory) == config
  assert config.scale_decoder_outputs == config.tie_word_embeddings


def test_import_with_bfloat16_parameters(tmp_path):
  config = CONFIGS["gpt2"]
  params = _bank(config)
  directory = export_checkpoint(config, params, str(tmp_path / "ckpt"))
  config16, params16 = import_checkpoint(directory, param_dtype="bfloat16", dtype="bfloat16")
  assert (config16.param_dtype, config16.dtype) == ("bfloat16", "bfloat16")
  expected = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
  _assert_trees_equal(params16, expected)


@pytest.mark.parametrize("first_shard, second_shard", [(20_000, None), (None, 20_000)])
def test_overwrite_replaces_every_weight_file_of_a_previous_export(
  tmp_path, first_shard, second_shard
):
  config = CONFIGS["t5_v1_0"]
  directory = str(tmp_path / "ckpt")
  export_checkpoint(config, _bank(config, seed=1), directory, max_shard_bytes=first_shard)
  new = _bank(config, seed=2)
  export_checkpoint(config, new, directory, max_shard_bytes=second_shard, overwrite=True)
  _assert_trees_equal(import_checkpoint(directory)[1], new)
  files = set(os.listdir(directory))
  if second_shard is None:
    assert files == {"config.json", SAFETENSORS}
  else:
    index = json.load(open(os.path.join(directory, INDEX)))
    assert files == {"config.json", INDEX, *index["weight_map"].values()}


# ---- errors ---------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"architectures": ["BertModel"], "model_type": "bert"}, f)
  assert "BertModel" in _error(str(tmp_path))


def test_missing_config_json(hf_checkpoint, tmp_path):
  directory = _copy(hf_checkpoint("gpt2")[0], tmp_path / "ckpt")
  os.remove(os.path.join(directory, "config.json"))
  assert "config.json" in _error(directory)


def test_missing_weights_file(hf_checkpoint, tmp_path):
  directory = _copy(hf_checkpoint("gpt2")[0], tmp_path / "ckpt")
  os.remove(os.path.join(directory, SAFETENSORS))
  assert SAFETENSORS in _error(directory)


@pytest.mark.parametrize(
  "kind, name",
  [
    ("t5_v1_0", "decoder.block.2.layer.1.EncDecAttention.k.weight"),
    ("t5_v1_0", "shared.weight"),
    ("gpt2", "transformer.h.1.attn.c_attn.weight"),
  ],
)
def test_missing_tensor(hf_checkpoint, tmp_path, kind, name):
  directory = _copy(hf_checkpoint(kind)[0], tmp_path / "ckpt")
  _edit_tensors(directory, lambda t: t.pop(name))
  assert repr(name) in _error(directory)


def test_unexpected_tensor(hf_checkpoint, tmp_path):
  directory = _copy(hf_checkpoint("t5_v1_0")[0], tmp_path / "ckpt")
  name = "encoder.block.0.layer.0.SelfAttention.extra.weight"
  _edit_tensors(directory, lambda t: t.update({name: np.zeros((4, 4), np.float32)}))
  assert repr(name) in _error(directory)


@pytest.mark.parametrize(
  "kind, name, shape",
  [
    ("t5_v1_0", "encoder.final_layer_norm.weight", (33,)),
    ("t5_v1_0", "encoder.block.1.layer.0.SelfAttention.q.weight", (40, 32)),
    ("t5_v1_0", "encoder.block.1.layer.0.SelfAttention.o.weight", (32, 24)),
    ("t5_v1_1", "decoder.block.0.layer.2.DenseReluDense.wi_1.weight", (64, 16)),
    ("t5_v1_0", "shared.weight", (100, 32)),
    ("gpt2", "transformer.h.0.attn.c_attn.weight", (32, 90)),
    ("gpt2", "transformer.h.2.mlp.c_fc.weight", (32, 100)),
    ("gpt2", "transformer.h.1.attn.c_attn.bias", (90,)),
    # Right size for a reshape, or extra columns a slice would silently drop:
    ("gpt2", "transformer.h.0.attn.c_attn.weight", (32, 97)),
    ("gpt2", "transformer.h.0.attn.c_attn.bias", (100,)),
    ("gpt2", "transformer.h.0.attn.c_proj.weight", (16, 64)),
    ("t5_v1_0", "encoder.block.0.layer.0.SelfAttention.o.weight", (64, 16)),
  ],
)
def test_tensor_with_wrong_shape(hf_checkpoint, tmp_path, kind, name, shape):
  directory = _copy(hf_checkpoint(kind)[0], tmp_path / "ckpt")
  _edit_tensors(directory, lambda t: t.update({name: np.zeros(shape, np.float32)}))
  message = _error(directory)
  assert repr(name) in message and str(shape) in message


@pytest.mark.parametrize(
  "kind, name, twin",
  [
    ("t5_v1_0", "lm_head.weight", "shared.weight"),
    ("t5_v1_1", "encoder.embed_tokens.weight", "shared.weight"),
    ("gpt2", "lm_head.weight", "transformer.wte.weight"),
  ],
)
def test_tied_tensor_that_differs(hf_checkpoint, tmp_path, kind, name, twin):
  directory = _copy(hf_checkpoint(kind)[0], tmp_path / "ckpt")

  def tie(tensors, delta):
    tensors[name] = tensors[twin] + delta

  _edit_tensors(directory, lambda t: tie(t, 0.0))
  import_checkpoint(directory)  # an equal twin is accepted
  _edit_tensors(directory, lambda t: tie(t, 1e-3))
  message = _error(directory)
  assert repr(name) in message and repr(twin) in message


def test_shard_missing_from_sharded_checkpoint(tmp_path):
  config = CONFIGS["gpt2"]
  directory = export_checkpoint(
    config, _bank(config), str(tmp_path / "ckpt"), max_shard_bytes=20_000
  )
  shard = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[1]
  os.remove(os.path.join(directory, shard))
  assert shard in _error(directory)


def test_damaged_safetensors_file(hf_checkpoint, tmp_path):
  directory = _copy(hf_checkpoint("t5_v1_1")[0], tmp_path / "ckpt")
  path = os.path.join(directory, SAFETENSORS)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  assert SAFETENSORS in _error(directory)
  with open(path, "wb") as f:
    f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
  assert SAFETENSORS in _error(directory)


def test_export_into_non_empty_directory_needs_overwrite(tmp_path):
  config = CONFIGS["gpt2"]
  directory = tmp_path / "busy"
  directory.mkdir()
  (directory / "notes.txt").write_text("keep me")
  (directory / "config.json").write_text("{}")
  with pytest.raises(HFInteropError) as info:
    export_checkpoint(config, _bank(config), str(directory))
  assert str(directory) in str(info.value) and "\n" not in str(info.value)
  assert sorted(os.listdir(directory)) == ["config.json", "notes.txt"]
  assert (directory / "notes.txt").read_text() == "keep me"
  assert (directory / "config.json").read_text() == "{}"
  export_checkpoint(config, _bank(config), str(directory), overwrite=True)
  assert import_checkpoint(str(directory))[0] == config


def test_export_rejects_a_bank_missing_a_parameter(tmp_path):
  config = CONFIGS["t5_v1_1_untied"]
  params = _bank(config)
  del params["lm_head"]
  with pytest.raises(HFInteropError, match="lm_head/kernel"):
    export_checkpoint(config, params, str(tmp_path / "out"))
