"""Moving tokens to the modules their router chose and the results back.

A *transport* has ``send(x_TX) -> buffers [N, C, X]`` and ``receive(buffers, weight_TK) -> y_TX``
(each token's kept slots' results, weighted and summed; SKIP and dropped slots give nothing).

* :class:`Dense` (the reference): every module gets every token (C = T) and ``receive`` masks
  with the routing weights: compute grows with the pool size N.
* :class:`Gather` (exact, for a few tokens): each (token, kept slot) row runs its own module,
  whose weights are gathered for it (``params``), so T*K modules' weights are read instead of N:
  less work and traffic than :class:`Dense` while T*K < N, as when decoding a few rows.
* :class:`Capacity` (MaxText's and Switch's dropping scheme): module n gets a buffer of
  ``C = ceil(capacity_factor * T * K / N)`` rows (T tokens, K kept slots), filled by gathering
  the tokens routed to it, and ``receive`` gathers each token's rows back. Buffers hold about
  ``capacity_factor * T * K`` rows whatever N is, so the FLOPs scale with K, not N. A token
  routed to a full module is dropped there (as if it had chosen SKIP); ``capacity_factor=0``
  makes C = T, which never drops. Assignments are ranked position-major (all rows' position 0,
  then position 1, ...; a token's first choice before its second), so whether a token is dropped
  depends only on tokens at its own or earlier positions: causality holds.

A transport also says which weights its buffers run through (``params(pool)``: the pool itself,
or the gathered modules). ``dispatch="exact"`` (:func:`transport`) picks :class:`Gather` when
T*K < N and :class:`Dense` otherwise: never a drop, so scoring and cached decoding use it.

``jax.lax.ragged_dot`` would avoid drops, but XLA:CPU lowers it to a dense product over every
group (DESIGN.md, "Pitfalls"), so on CPU it costs what :class:`Dense` does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from modjax.methods.mom.routers import Routing


def _pad_row(x):
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)


def _flat(r: Routing):
  tokens = r.index_BLK.shape[0] * r.index_BLK.shape[1]
  return r.index_BLK.reshape(tokens, -1), r.weight_BLK.reshape(tokens, -1)


class Dense:
  """Every module runs on every token; the routing weights mask the results."""

  def __init__(self, routing: Routing, modules: int):
    self.modules = modules
    self.index_TK, self.weight_TK = _flat(routing)
    self.dropped = jnp.zeros((), jnp.float32)

  def params(self, pool):
    return pool

  def send(self, x_TX):
    return jnp.broadcast_to(x_TX[None], (self.modules,) + x_TX.shape)

  def receive(self, buffers_NTX, weight_TK):
    # one_hot of SKIP (index N) is a zero row, so SKIP contributes nothing
    coef_TN = jnp.einsum("tk,tkn->tn", weight_TK, jax.nn.one_hot(self.index_TK, self.modules))
    return jnp.einsum("tn,nt...->t...", coef_TN.astype(buffers_NTX.dtype), buffers_NTX)


class Gather:
  """Row t*K + k runs the module token t kept in slot k, with that module's gathered weights."""

  def __init__(self, routing: Routing, modules: int):
    self.modules = modules
    self.index_TK, _ = _flat(routing)
    self.dropped = jnp.zeros((), jnp.float32)

  def params(self, pool):
    """The pool's weights of each row's module: ``[T*K, ...]`` (a SKIP row takes module 0's;
    ``receive`` discards its result)."""
    row_module = jnp.minimum(self.index_TK, self.modules - 1).reshape(-1)
    return jax.tree.map(lambda w: w[row_module], pool)

  def send(self, x_TX):
    return jnp.repeat(x_TX, self.index_TK.shape[1], axis=0)[:, None]  # [T*K, 1, X]

  def receive(self, buffers_R1X, weight_TK):
    y_TKX = buffers_R1X.reshape(self.index_TK.shape + buffers_R1X.shape[2:])
    coef_TK = jnp.where(self.index_TK < self.modules, weight_TK, 0).astype(y_TKX.dtype)
    return jnp.einsum("tk,tk...->t...", coef_TK, y_TKX)


def buffer_rows(tokens: int, k: int, modules: int, capacity_factor: float) -> int:
  """C, the rows of each module's buffer: ``ceil(capacity_factor * T * K / N)``, at most T;
  T when ``capacity_factor`` is 0 (never drops)."""
  if capacity_factor == 0:
    return tokens
  return min(tokens, math.ceil(capacity_factor * tokens * k / modules))


class Capacity:
  """Gather into per-module buffers of a fixed capacity, gather back (see the module doc)."""

  def __init__(self, routing: Routing, modules: int, capacity_factor: float):
    batch, length, k = routing.index_BLK.shape
    tokens = batch * length
    self.modules = modules
    self.capacity = capacity = buffer_rows(tokens, k, modules, capacity_factor)
    # position-major order: [L, B, K] flattened
    index = jnp.swapaxes(routing.index_BLK, 0, 1).reshape(-1)
    real = jnp.swapaxes(routing.mask_BL, 0, 1)[..., None] > 0
    valid = (index < modules) & jnp.broadcast_to(real, (length, batch, k)).reshape(-1)
    module = jnp.where(valid, index, modules)
    onehot = jax.nn.one_hot(module, modules, dtype=jnp.int32)  # SKIP / padding: zero row
    before = jnp.cumsum(onehot, axis=0) - onehot
    position = jnp.take_along_axis(before, jnp.minimum(module, modules - 1)[:, None], 1)[:, 0]
    kept = valid & (position < capacity)
    row = jnp.where(kept, module * capacity + position, modules * capacity)
    token = jnp.arange(length)[:, None, None] + length * jnp.arange(batch)[None, :, None]
    token = jnp.broadcast_to(token, (length, batch, k)).reshape(-1)
    self.tokens_NC = (
      jnp.full((modules * capacity + 1,), tokens, jnp.int32)
      .at[row]
      .set(token.astype(jnp.int32))[:-1]
      .reshape(modules, capacity)
    )
    self.row_TK = jnp.swapaxes(row.reshape(length, batch, k), 0, 1).reshape(tokens, k)
    self.dropped = jnp.sum(valid & ~kept) / jnp.maximum(jnp.sum(valid), 1)

  def params(self, pool):
    return pool

  def send(self, x_TX):
    return _pad_row(x_TX)[self.tokens_NC]

  def receive(self, buffers_NCX, weight_TK):
    flat = _pad_row(buffers_NCX.reshape((-1,) + buffers_NCX.shape[2:]))
    picked_TKX = flat[self.row_TK]
    weight = weight_TK.reshape(weight_TK.shape + (1,) * (picked_TKX.ndim - 2))
    return jnp.sum(picked_TKX * weight.astype(picked_TKX.dtype), axis=1)


def exact_kind(rows: int, modules: int) -> str:
  """What ``dispatch="exact"`` runs for ``rows`` (token, slot) pairs over a pool of ``modules``:
  ``"gather"`` while there are fewer rows than modules, else ``"dense"``."""
  return "gather" if rows < modules else "dense"


def transport(kind: str, routing: Routing, modules: int, capacity_factor: float):
  """The ``MoMConfig.dispatch`` transport for one routing decision."""
  if kind == "exact":
    kind = exact_kind(math.prod(routing.index_BLK.shape), modules)  # T*K, known when tracing
  if kind == "dense":
    return Dense(routing, modules)
  if kind == "gather":
    return Gather(routing, modules)
  return Capacity(routing, modules, capacity_factor)
