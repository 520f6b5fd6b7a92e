"""The model's weight contractions with their gradients written out in the layout XLA:CPU wants.

Autodiff transposes ``y = x . W`` into ``dW^T = g^T . x`` followed by a transpose, and
XLA:CPU then lays the matmul out by copying the larger operand: in a t5-small train step it
transposed every FFN activation gradient ([tokens, d_ff]: 16 MB, recomputing the ReLU and
dropout masks inside the copy) and the LM head's [tokens, vocab] logit gradient (64 MB). Writing
the weight gradient as ``dW = x^T . g`` contracted over the token axes, with the output already
in the kernel's layout, lets XLA run it as one matmul on the operands as they are. Values are
the same contractions as autodiff's (tests/test_parity.py checks gradients against PyTorch's).

:func:`dense` and :func:`tied_logits` take these VJPs where ``modjax.core.cpu_kernels`` says so (XLA:CPU
by default) and otherwise the plain contraction under autodiff, which TPU and GPU compilers fuse
and shard without help (tests/test_cpu_kernels.py checks that both give the same values and
gradients).
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from modjax.core.cpu_kernels import use_cpu_kernels


def dense(x, kernel, in_dims: int):
  """``x``'s last ``in_dims`` axes contracted with ``kernel``'s first ``in_dims`` axes:
  [..., *in] x [*in, *out] -> [..., *out] (a ``Projection``)."""
  if use_cpu_kernels():
    return dense_cpu(x, kernel, in_dims)
  return _dense(x, kernel, in_dims)


def tied_logits(x_BLD, embedding_VD):
  """Float32 logits ``x . E^T`` against a [vocab, d_model] embedding (a tied LM head)."""
  if use_cpu_kernels():
    return tied_logits_cpu(x_BLD, embedding_VD)
  return _tied_logits(x_BLD, embedding_VD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_cpu(x, kernel, in_dims: int):
  """:func:`dense` with the weight gradient written in the kernel's layout."""
  return _dense(x, kernel, in_dims)


def _dense(x, kernel, in_dims):
  contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
  return lax.dot_general(x, kernel, (contract, ((), ())))


def _dense_fwd(x, kernel, in_dims):
  return _dense(x, kernel, in_dims), (x, kernel)


def _dense_bwd(in_dims, residuals, g):
  x, kernel = residuals
  lead, out_dims = x.ndim - in_dims, kernel.ndim - in_dims
  g_out = tuple(range(g.ndim - out_dims, g.ndim))
  k_out = tuple(range(in_dims, kernel.ndim))
  dx = lax.dot_general(g, kernel, ((g_out, k_out), ((), ())))
  tokens = tuple(range(lead))
  dkernel = lax.dot_general(x, g, ((tokens, tokens), ((), ())))  # [*in, *out]: kernel layout
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


dense_cpu.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def tied_logits_cpu(x_BLD, embedding_VD):
  """:func:`tied_logits` with both gradients in the compute dtype, accumulated in float32."""
  return _tied_logits(x_BLD, embedding_VD)


def _tied_logits(x, embedding):
  return lax.dot_general(
    x, embedding, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type="float32"
  )


def _tied_logits_fwd(x, embedding):
  return _tied_logits(x, embedding), (x, embedding)


def _tied_logits_bwd(residuals, g):
  """Both gradients in the compute dtype (x's) with float32 accumulation."""
  x, embedding = residuals
  g = g.astype(x.dtype)
  last = g.ndim - 1
  f32 = "float32"
  dx = lax.dot_general(g, embedding, (((last,), (0,)), ((), ())), preferred_element_type=f32)
  tokens = tuple(range(last))
  dembedding = lax.dot_general(g, x, ((tokens, tokens), ((), ())), preferred_element_type=f32)
  return dx.astype(x.dtype), dembedding.astype(embedding.dtype)  # dembedding: [V, D]


tied_logits_cpu.defvjp(_tied_logits_fwd, _tied_logits_bwd)
