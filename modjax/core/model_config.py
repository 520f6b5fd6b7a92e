"""Model hyper-parameters as frozen dataclasses (pure data, hashable, jit-static).

``T5Config`` covers T5 v1.0 (ReLU FFN, embeddings tied to the LM head with the
``d_model**-0.5`` rescale) and v1.1 / Flan-T5 (gated-GELU FFN, untied head).
``GPT2Config`` is the GPT-2 pre-LN decoder with learned positions and a tied head.
Field names follow Hugging Face's config.json where one exists.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from modjax.core.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_T5_FFN = ("relu", "gated-gelu", "gated-relu", "gelu")


class ModelConfigError(UserError, ValueError):
  """An inconsistent or unsupported model configuration."""


def to_dtype(name: str):
  if name not in DTYPES:
    raise ModelConfigError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_heads: int = 8
  num_layers: int = 6
  num_decoder_layers: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  # Multiply the decoder output by d_model**-0.5 before the LM head (T5 v1.0: True). Hugging Face
  # 4.x derived it from tie_word_embeddings; 5.x stores it apart and always ties the head.
  scale_decoder_outputs: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  param_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    if self.feed_forward_proj not in _T5_FFN:
      raise ModelConfigError(
        f"feed_forward_proj={self.feed_forward_proj!r} is not supported; use one of {_T5_FFN}"
      )
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers"):
      if getattr(self, name) <= 0:
        raise ModelConfigError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    if self.num_decoder_layers <= 0:
      raise ModelConfigError("T5Config.num_decoder_layers must be positive")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ModelConfigError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
    to_dtype(self.param_dtype), to_dtype(self.dtype)

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    """Hugging Face's name (``dense_act_fn``) of the FFN nonlinearity, derived as transformers'
    T5Config does: the part after 'gated-', except that 'gated-gelu' means 'gelu_new' (tanh
    approximation) while plain 'gelu' is the exact erf GELU."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  layer_norm_epsilon: float = 1e-5
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
      if getattr(self, name) <= 0:
        raise ModelConfigError(f"GPT2Config.{name} must be positive, got {getattr(self, name)}")
    if self.n_embd % self.n_head:
      raise ModelConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
    to_dtype(self.param_dtype), to_dtype(self.dtype)

  @property
  def d_ff(self) -> int:
    return self.n_inner or 4 * self.n_embd

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head
