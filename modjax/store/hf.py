"""Hugging Face checkpoints <-> modjax banks, for T5ForConditionalGeneration and GPT2LMHeadModel.

Reads and writes ``save_pretrained`` directories (``config.json`` + ``model.safetensors``, or a
sharded ``model.safetensors.index.json``) with numpy only; no PyTorch needed. One table per
architecture lists (HF tensor name, bank path, layout transform), so import and export are exact
inverses. Tied tensors HF may or may not write (``encoder.embed_tokens``, a tied ``lm_head``)
are accepted when equal to the tensor they are tied to.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from modjax.core.errors import UserError
from modjax.core.model_config import GPT2Config, T5Config
from modjax.models import architecture_for

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class HFInteropError(UserError, ValueError):
  """A checkpoint that cannot be converted; the message names the file or tensor."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  hf_name: str
  path: tuple[str, ...]
  to_bank: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
  return x


def _transpose(x):
  return np.ascontiguousarray(x.T)


def _heads_in(h, k):  # HF [H*K, D] (out, in) -> bank DHK
  return lambda w: np.ascontiguousarray(w.T.reshape(w.shape[1], h, k))


def _heads_in_back(w):  # bank DHK -> HF [H*K, D]
  return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def _heads_out(h, k):  # HF [D, H*K] -> bank HKD
  return lambda w: np.ascontiguousarray(w.T.reshape(h, k, w.shape[0]))


def _heads_out_back(w):  # bank HKD -> HF [D, H*K]
  return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)


def _same(hf_name: str, path: tuple[str, ...]) -> _Entry:
  """An entry stored the same way on both sides."""
  return _Entry(hf_name, path, _identity, _identity)


def _t5_entries(c: T5Config) -> list[_Entry]:
  entries = [_same("shared.weight", ("token_embedding", "embedding"))]
  for stack, n in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
    relpos = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    entries.append(_same(relpos, (stack, "relpos_bias", "embedding")))
    entries.append(_same(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale")))
    for i in range(n):
      entries += _t5_block_entries(c, stack, i)
  if not c.tie_word_embeddings:
    entries.append(_Entry("lm_head.weight", ("lm_head", "kernel"), _transpose, _transpose))
  return entries


def _t5_block_entries(c: T5Config, stack: str, i: int) -> list[_Entry]:
  """One T5 block's entries: its attention sublayers (self; cross in the decoder), then FFN."""
  attns = [("SelfAttention", "self_attn")]
  attns += [("EncDecAttention", "cross_attn")] if stack == "decoder" else []
  pre, blk = f"{stack}.block.{i}.layer", (stack, "blocks", str(i))
  heads_in, heads_out = _heads_in(c.num_heads, c.d_kv), _heads_out(c.num_heads, c.d_kv)
  entries = []
  for sub, (hf_attn, name) in enumerate(attns):
    for hf_p, p in (("q", "query"), ("k", "key"), ("v", "value")):
      path = blk + (name, p, "kernel")
      entries.append(_Entry(f"{pre}.{sub}.{hf_attn}.{hf_p}.weight", path, heads_in, _heads_in_back))
    path = blk + (name, "out", "kernel")
    entries.append(_Entry(f"{pre}.{sub}.{hf_attn}.o.weight", path, heads_out, _heads_out_back))
    entries.append(_same(f"{pre}.{sub}.layer_norm.weight", blk + (f"{name}_norm", "scale")))
  sub = len(attns)
  for w in ["wi_0", "wi_1", "wo"] if c.is_gated else ["wi", "wo"]:
    path = blk + ("ffn", w, "kernel")
    entries.append(_Entry(f"{pre}.{sub}.DenseReluDense.{w}.weight", path, _transpose, _transpose))
  entries.append(_same(f"{pre}.{sub}.layer_norm.weight", blk + ("ffn_norm", "scale")))
  return entries


def _gpt2_entries(c: GPT2Config) -> list[_Entry]:
  h, k, d = c.n_head, c.head_dim, c.n_embd
  entries = [
    _Entry("transformer.wte.weight", ("token_embedding", "embedding"), _identity, _identity),
    _Entry("transformer.wpe.weight", ("position_embedding", "embedding"), _identity, _identity),
    _Entry("transformer.ln_f.weight", ("decoder", "final_norm", "scale"), _identity, _identity),
    _Entry("transformer.ln_f.bias", ("decoder", "final_norm", "bias"), _identity, _identity),
  ]
  for i in range(c.n_layer):
    pre, blk = f"transformer.h.{i}", ("decoder", "blocks", str(i))
    for hf_ln, ln in (("ln_1", "self_attn_norm"), ("ln_2", "ffn_norm")):
      for p, q in (("weight", "scale"), ("bias", "bias")):
        entries.append(_Entry(f"{pre}.{hf_ln}.{p}", blk + (ln, q), _identity, _identity))
    # c_attn is a Conv1D [D, 3D] (in, out) holding q, k, v side by side; split into three entries.
    for j, name in enumerate(("query", "key", "value")):
      cols = slice(j * d, (j + 1) * d)
      entries.append(
        _Entry(
          f"{pre}.attn.c_attn.weight#{j}",
          blk + ("self_attn", name, "kernel"),
          lambda w, cols=cols: np.ascontiguousarray(w[:, cols].reshape(d, h, k)),
          lambda w: w.reshape(d, d),
        )
      )
      entries.append(
        _Entry(
          f"{pre}.attn.c_attn.bias#{j}",
          blk + ("self_attn", name, "bias"),
          lambda b, cols=cols: b[cols].reshape(h, k),
          lambda b: b.reshape(d),
        )
      )
    entries += [
      _Entry(
        f"{pre}.attn.c_proj.weight",
        blk + ("self_attn", "out", "kernel"),
        lambda w: w.reshape(h, k, d),
        lambda w: w.reshape(d, d),
      ),
      _Entry(f"{pre}.attn.c_proj.bias", blk + ("self_attn", "out", "bias"), _identity, _identity),
      _Entry(f"{pre}.mlp.c_fc.weight", blk + ("ffn", "wi", "kernel"), _identity, _identity),
      _Entry(f"{pre}.mlp.c_fc.bias", blk + ("ffn", "wi", "bias"), _identity, _identity),
      _Entry(f"{pre}.mlp.c_proj.weight", blk + ("ffn", "wo", "kernel"), _identity, _identity),
      _Entry(f"{pre}.mlp.c_proj.bias", blk + ("ffn", "wo", "bias"), _identity, _identity),
    ]
  return entries


# Tensors HF may write that duplicate another (tied) or are non-parameter buffers.
def _t5_optional(c: T5Config) -> dict[str, str | None]:
  tied = {
    "encoder.embed_tokens.weight": "shared.weight",
    "decoder.embed_tokens.weight": "shared.weight",
  }
  if c.tie_word_embeddings:
    tied["lm_head.weight"] = "shared.weight"
  tied["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = None
  return tied


def _gpt2_optional(c: GPT2Config) -> dict[str, str | None]:
  optional = {"lm_head.weight": "transformer.wte.weight"}
  for i in range(c.n_layer):
    optional[f"transformer.h.{i}.attn.bias"] = None
    optional[f"transformer.h.{i}.attn.masked_bias"] = None
  return optional


_T5_FIELDS = [
  f.name for f in dataclasses.fields(T5Config) if f.name not in ("param_dtype", "dtype")
]
_GPT2_FIELDS = [
  f.name for f in dataclasses.fields(GPT2Config) if f.name not in ("param_dtype", "dtype")
]
ARCHITECTURES = ("T5ForConditionalGeneration", "GPT2LMHeadModel")


def read_config(directory: str, **dtypes) -> T5Config | GPT2Config:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise HFInteropError(f"{path} not found; give a save_pretrained directory with config.json")
  try:
    raw = json.load(open(path))
  except json.JSONDecodeError as e:
    raise HFInteropError(f"{path} is not valid JSON ({e}); re-export the checkpoint") from None
  archs = raw.get("architectures") or []
  if "T5ForConditionalGeneration" in archs or (not archs and raw.get("model_type") == "t5"):
    kw = {k: raw[k] for k in _T5_FIELDS if raw.get(k) is not None}
    kw.setdefault("num_decoder_layers", raw.get("num_layers", T5Config.num_layers))
    # transformers 4.x: the rescale follows tie_word_embeddings; 5.x stores scale_decoder_outputs.
    kw["scale_decoder_outputs"] = raw.get(
      "scale_decoder_outputs", kw.get("tie_word_embeddings", True)
    )
    config = T5Config(**kw, **dtypes)
    # transformers derives dense_act_fn from feed_forward_proj, but a stored one takes precedence.
    if raw.get("dense_act_fn") not in (None, config.activation):
      raise HFInteropError(
        f"{path}: dense_act_fn={raw['dense_act_fn']!r} is not supported with feed_forward_proj="
        f"{config.feed_forward_proj!r} (only {config.activation!r})"
      )
    return config
  if "GPT2LMHeadModel" in archs or (not archs and raw.get("model_type") == "gpt2"):
    if raw.get("activation_function", "gelu_new") != "gelu_new":
      raise HFInteropError(
        f"{path}: activation_function={raw['activation_function']!r} is not supported"
      )
    return GPT2Config(**{k: raw[k] for k in _GPT2_FIELDS if k in raw}, **dtypes)
  raise HFInteropError(
    f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; supported: {ARCHITECTURES}"
  )


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  index = os.path.join(directory, INDEX)
  if os.path.isfile(index):
    files = sorted(set(json.load(open(index))["weight_map"].values()))
  elif os.path.isfile(os.path.join(directory, SAFETENSORS)):
    files = [SAFETENSORS]
  else:
    raise HFInteropError(
      f"no {SAFETENSORS} or {INDEX} in {directory}; save with safe_serialization=True"
    )
  tensors = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise HFInteropError(f"shard {path} listed in {INDEX} is missing; copy the whole checkpoint")
    try:
      tensors.update(load_file(path))
    except Exception as e:  # safetensors raises several types for damaged files
      raise HFInteropError(
        f"cannot read {path} ({type(e).__name__}: {e}); the file is damaged"
      ) from None
  return tensors


def _entries(config):
  if isinstance(config, T5Config):
    return _t5_entries(config), _t5_optional(config)
  return _gpt2_entries(config), _gpt2_optional(config)


def _hf_tensor(tensors, name):
  """The stored tensor behind an entry (``name#i`` is piece i of a fused tensor) and its name."""
  base = name.partition("#")[0]
  return tensors.get(base), base


def import_checkpoint(directory: str, param_dtype: str = "float32", dtype: str = "float32"):
  """Reads a ``save_pretrained`` directory. Returns (config, params) with numpy arrays."""
  config = read_config(directory, param_dtype=param_dtype, dtype=dtype)
  entries, optional = _entries(config)
  tensors = _read_tensors(directory)
  used, params = set(), {}
  parts = collections.Counter(e.hf_name.partition("#")[0] for e in entries)
  for e in entries:
    value, base = _hf_tensor(tensors, e.hf_name)
    if value is None:
      raise HFInteropError(
        f"tensor {base!r} is missing from {directory}; the checkpoint does not match config.json"
      )
    used.add(base)
    expected = _expected_shape(config, e.path)
    # Check the HF tensor's own shape, not only the converted one: a reshape can fail (a raw
    # numpy error) or succeed on a wrong shape with the right size, and slicing a fused tensor
    # (GPT-2 c_attn) can silently drop extra columns.
    hf_shape = None if expected is None else _hf_shape(e, expected, parts[base])
    if hf_shape is not None and tuple(value.shape) != hf_shape:
      raise HFInteropError(
        f"tensor {base!r} has shape {tuple(value.shape)}, which does not fit config.json "
        f"(expected {hf_shape} for {'/'.join(e.path)})"
      )
    bank_value = e.to_bank(value.astype(np.float32))
    node = params
    for key in e.path[:-1]:
      node = node.setdefault(key, {})
    node[e.path[-1]] = bank_value.astype(_np_dtype(param_dtype))
  for name in sorted(set(tensors) - used):
    if name not in optional:
      raise HFInteropError(
        f"unexpected tensor {name!r} in {directory}; it is not part of {type(config).__name__}"
      )
    twin = optional[name]
    if twin is not None and not np.array_equal(tensors[name], tensors[twin]):
      raise HFInteropError(
        f"tensor {name!r} should be tied to {twin!r} but differs; the checkpoint is inconsistent"
      )
  return config, params


def _hf_shape(entry, bank_shape, num_parts):
  """Shape of the HF tensor behind ``entry`` (all ``num_parts`` pieces of a fused tensor)."""
  part = entry.to_hf(np.broadcast_to(np.zeros((), np.int8), bank_shape)).shape  # 1 byte/value
  return (*part[:-1], part[-1] * num_parts)


def _np_dtype(name):
  return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(name, np.float32)


def _expected_shape(config, path):
  shapes = _shape_tree(architecture_for(config))
  node = shapes
  for key in path:
    if key not in node:
      return None
    node = node[key]
  return tuple(node.shape)


_SHAPES_CACHE: dict = {}


def _shape_tree(model):
  if model not in _SHAPES_CACHE:
    _SHAPES_CACHE[model] = jax.eval_shape(model.init, jax.random.key(0))
  return _SHAPES_CACHE[model]


def export_checkpoint(
  config, params, directory: str, *, max_shard_bytes: int | None = None, overwrite: bool = False
) -> str:
  """Writes ``params`` as a ``save_pretrained`` directory that ``from_pretrained`` loads."""
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise HFInteropError(
      f"{directory} exists and is not empty; choose a new directory or pass overwrite=True"
    )
  entries, _ = _entries(config)
  tensors: dict[str, np.ndarray] = {}
  for e in entries:
    node = params
    for key in e.path:
      if key not in node:
        raise HFInteropError(
          f"parameter {'/'.join(e.path)} is missing; the bank does not match its config"
        )
      node = node[key]
    value = e.to_hf(np.asarray(node, dtype=np.float32))
    base, _, part = e.hf_name.partition("#")
    if part:  # pieces of one fused HF tensor (GPT-2 c_attn), concatenated along the output axis
      tensors.setdefault(base, []).append(value)
    else:
      tensors[base] = value
  tensors = {
    k: (np.concatenate(v, axis=-1) if isinstance(v, list) else v) for k, v in tensors.items()
  }
  os.makedirs(directory, exist_ok=True)
  _remove_weight_files(directory)
  _write_config(config, directory)
  _write_tensors(tensors, directory, max_shard_bytes)
  return directory


def _remove_weight_files(directory):
  """Deletes safetensors weights of an earlier export (on overwrite): a stale index or shard
  would otherwise be read instead of, or mixed with, the new weights."""
  for name in os.listdir(directory):
    if name in (SAFETENSORS, INDEX) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
      os.remove(os.path.join(directory, name))


def _write_config(config, directory):
  if isinstance(config, T5Config):
    raw = {k: getattr(config, k) for k in _T5_FIELDS}
    raw.update(
      architectures=["T5ForConditionalGeneration"],
      model_type="t5",
      is_encoder_decoder=True,
      dense_act_fn=config.activation,
      is_gated_act=config.is_gated,
    )
  else:
    raw = {k: getattr(config, k) for k in _GPT2_FIELDS}
    raw.update(
      architectures=["GPT2LMHeadModel"],
      model_type="gpt2",
      activation_function="gelu_new",
      tie_word_embeddings=True,
    )
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(raw, f, indent=2, sort_keys=True)


def _write_tensors(tensors, directory, max_shard_bytes):
  if max_shard_bytes is None:
    save_file(tensors, os.path.join(directory, SAFETENSORS), metadata={"format": "pt"})
    return
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name], size = tensors[name], size + nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
